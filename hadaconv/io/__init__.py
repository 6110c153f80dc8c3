"""Loading models safely, and saving and loading converted folders.

Inputs :func:`load_model` accepts (never modifying them):

* a Hugging Face folder (``config.json`` + ``*.safetensors`` or ``*.bin``), through transformers;
* a GGUF file (dequantized by transformers' ``gguf_file=``);
* a ``.safetensors`` file or a ``torch.save``d state dict, with ``config=`` (a config.json or a
  folder holding one);
* a converted hadaconv folder (delegates to :func:`load`);
* a ``torch.save``d whole module, only with ``trust_pickle=True``: unpickling can run arbitrary
  code, so anything ``torch.load(weights_only=True)`` refuses is refused unless the user says so.

Every file is untrusted: headers, sizes and depths are checked before anything is allocated.
The modules, in the order data flows: :mod:`~hadaconv.io.files` (reading JSON and safetensors),
:mod:`~hadaconv.io.build` (a model from its config, weights loaded strictly),
:mod:`~hadaconv.io.converted` (converted folders: save, load) and :mod:`~hadaconv.io.inputs`
(:func:`load_model` and the checks on its options).
"""

from hadaconv.io.files import SHARD_INDEX, TIED_KEY, TOKENIZER_FILES, WEIGHTS, shard_map, source_key
from hadaconv.io.build import resolve_config
from hadaconv.io.converted import (check_savable, hadaconv_meta, load, load_tokenizer, original_path, save,
                                   save_converted)
from hadaconv.io.inputs import (TORCH_MODULE_TOKENIZER, Loaded, carries_config, check_format, check_model_config,
                                check_seq_len_early, lacks_tokenizer, load_model, recorded_config, recorded_source,
                                same_file, skeleton, source_tokenizer)

__all__ = ["Loaded", "SHARD_INDEX", "TIED_KEY", "TOKENIZER_FILES", "TORCH_MODULE_TOKENIZER", "WEIGHTS",
           "carries_config", "check_format", "check_model_config", "check_savable", "check_seq_len_early",
           "hadaconv_meta", "lacks_tokenizer", "load", "load_model", "load_tokenizer", "original_path",
           "recorded_config", "recorded_source", "resolve_config", "same_file", "save", "save_converted", "shard_map",
           "skeleton", "source_key", "source_tokenizer"]
