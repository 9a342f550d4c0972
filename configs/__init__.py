"""The shipped LightningCLI configs (the YAML files beside this one), installed as package data of
`polybyte.configs` so `polybyte demo` and `polybyte fit --config debug.yaml` find them in any
install; a regular package, so importlib.resources finds them in editable installs too."""
