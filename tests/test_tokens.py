"""models/tokens.py restates the byte stream's ids (models/ never imports modalities/): both agree."""

from polybyte import modalities
from polybyte.models import tokens
from polybyte.models.base import ByteLMConfig
from polybyte.models.megabyte import MegabyteConfig
from polybyte.models.patching import PatcherConfig


def test_models_tokens_equal_the_modalities_vocabulary():
    assert tokens.NUM_BYTES == modalities.NUM_BYTES
    assert tokens.PAD == modalities.PAD
    assert tokens.EOS == modalities.EOS
    assert tokens.VOCAB_SIZE == modalities.VOCAB_SIZE
    assert tokens.FIRST_TAG == min(modalities.TAGS.values())
    tag_ids = range(tokens.FIRST_TAG, tokens.FIRST_TAG + tokens.NUM_TAGS)
    assert set(modalities.TAGS.values()) <= set(tag_ids)
    assert set(modalities.base.RESERVED) <= set(tag_ids)
    assert tokens.FIRST_TAG + tokens.NUM_TAGS == tokens.VOCAB_SIZE


def test_config_defaults_use_the_vocabulary():
    assert (ByteLMConfig().vocab_size, ByteLMConfig().pad_id) == (tokens.VOCAB_SIZE, tokens.PAD)
    mb = MegabyteConfig()
    assert (mb.first_tag_id, mb.num_tags) == (tokens.FIRST_TAG, tokens.NUM_TAGS)
    assert PatcherConfig().pad_id == tokens.PAD
