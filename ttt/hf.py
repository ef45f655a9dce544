"""transformers interop (optional extra: pip install 'ttt-lm[hf]'): importing this module registers our
model with AutoConfig / AutoModelForCausalLM under model_type "ttt_lm".

    import ttt.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/x")           # a run or checkpoint directory of ours
    out = model.generate(ids, max_new_tokens=50, do_sample=False)    # the recurrent state is the cache

A run directory's config.json carries "model_type": "ttt_lm" when written by `ttt convert` or the trainer;
`TTTForCausalLMHF.from_pretrained(path)` loads any run directory, with or without it. The weights are read
by `ttt.checkpoint.load_model` (safetensors only). During generate() the model state (`LMState`: TTT inner
weights, conv windows) is carried from step to step in the `ttt_state` keyword, in the one-token steps' own form
(`TTTLM.decode_state`; `TTTLM.plain_state` gives the plain one): the prompt is consumed once, then each step feeds
only the newest token. Batched prompts must be unpadded (equal lengths): a recurrent
state cannot skip left padding, so an attention mask with zeros is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - the extra is missing
    raise ImportError("ttt.hf needs transformers: pip install 'ttt-lm[hf]'") from None

from .config import ModelConfig
from .model import LMState, TTTLM

MODEL_TYPE = "ttt_lm"


class TTTLMConfig(PretrainedConfig):
    """Our run config (config.json: {"model": ModelConfig fields, "vocab_size": V, ...}) as a transformers
    config; `ttt_config` is the ModelConfig."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict | None = None, vocab_size: int | None = None, **kwargs):
        self.model = dict(model or {})
        if vocab_size is not None:
            self.model.setdefault("vocab_size", vocab_size)
        self.vocab_size = self.model.get("vocab_size", 32000)
        kwargs.setdefault("tie_word_embeddings", bool(self.model.get("tie_embeddings", True)))
        super().__init__(**kwargs)

    @property
    def ttt_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)


@dataclass
class TTTLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ttt_state: LMState | None = None


class TTTForCausalLMHF(PreTrainedModel, GenerationMixin):
    """A transformers wrapper around `TTTLM` (attribute `lm`); forward(input_ids, ttt_state=None, labels=None)."""

    config_class = TTTLMConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _is_stateful = True  # a recurrent state, not a KV cache: no assisted/contrastive decoding

    def __init__(self, config: TTTLMConfig):
        super().__init__(config)
        self.lm = TTTLM(config.ttt_config)
        self.post_init()

    def _init_weights(self, module):  # TTTLM initialises itself (and weights are loaded after)
        pass

    def get_input_embeddings(self):
        return self.lm.embed

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """A run or checkpoint directory of ours (read with ttt.checkpoint.load_model); `device` (or a single
        device as `device_map`) and `dtype` are honoured, other loading options of transformers are not used."""
        from .checkpoint import load_model

        device_map = kwargs.pop("device_map", None)  # one device only ("cuda", "cpu"): no sharding
        device = kwargs.pop("device", None) or (device_map if isinstance(device_map, (str, torch.device)) else "cpu")
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        lm, cfg = load_model(pretrained_model_name_or_path, device)
        if not isinstance(config, TTTLMConfig):
            config = TTTLMConfig(model=cfg.to_dict())
        with torch.device("meta"):
            model = cls(config)
        model.lm = lm
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.eval()

    def forward(self, input_ids: torch.LongTensor, ttt_state: LMState | None = None, labels=None,
                attention_mask=None, use_cache: bool | None = None, return_dict: bool | None = None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: padded batches are not supported by the recurrent state; pass "
                             "equal-length (unpadded) prompts")
        logits, state = self.lm(input_ids, ttt_state)
        loss = None
        if labels is not None:  # transformers convention: labels are the inputs, shifted inside
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return TTTLMOutput(loss=loss, logits=logits, ttt_state=state)

    def prepare_inputs_for_generation(self, input_ids, ttt_state: LMState | None = None, attention_mask=None,
                                      **kwargs):
        if ttt_state is not None:
            input_ids = input_ids[:, ttt_state.pos:]  # only the tokens the state has not seen (one per step)
        return {"input_ids": input_ids, "ttt_state": ttt_state, "attention_mask": attention_mask}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1, **kwargs):
        model_kwargs["ttt_state"] = self.lm.decode_state(outputs.ttt_state)  # the one-token steps' own form
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], num_new_tokens)], -1)
        if model_kwargs.get("cache_position") is not None:
            model_kwargs["cache_position"] = model_kwargs["cache_position"][-1:] + num_new_tokens
        return model_kwargs


AutoConfig.register(MODEL_TYPE, TTTLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTLMConfig, TTTForCausalLMHF, exist_ok=True)
