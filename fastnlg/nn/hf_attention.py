"""`fastnlg.ops.flash_attention` as a Transformers attention implementation named "fastnlg".

    fastnlg.nn.hf_attention.register()          # once; fastnlg.patch does it
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastnlg")   # or set_attn_implementation

A layer gets the mask from Transformers' SDPA mask builder: None (plain causal, nothing padded) or a 4-D bool
(B, 1, T, S), True = attend. How it runs, in order:
- the torch backend (the CPU default) is SDPA under the spec's mask: a 4-D mask runs as given, as the
  unpatched model runs it (no conversion, no host read);
- on the Triton kernels a 4-D mask becomes the kernel's form (causal or not, the layer's window, a key
  padding mask), checked: the mask rebuilt from that form must equal the given one on every row that sees a key;
- a packed batch's document mask (position ids restarting at 0, checked against the mask) runs the varlen
  kernel (`cu_seqlens`);
- any other mask (prefix-LM, ...) runs SDPA under it (the spec's attention where SDPA cannot: softcap).
Conversions are cached per mask tensor (all layers share it); under torch.compile the check (a host read) is
skipped and a 4-D mask runs SDPA as given, so a compiled model has no graph break here.
"""
from __future__ import annotations

import logging
import sys
import weakref

import torch

from .. import backend as _backend
from ..ops.attention import BACKENDS, flash_attention, masked_attention_reference, visible_mask
from ..ops.relative_position_attention import relative_position_attention, relative_position_bias

NAME = "fastnlg"
logger = logging.getLogger("fastnlg")
_warned: set = set()
_cache: list = []  # [(weakref to the mask tensor, its version, window, is_causal, result)]
_packed_cache: list = []  # [(weakref to the mask, its version, weakref to the position ids, cu_seqlens)]
_sdpa_cache: dict = {}  # id(mask) -> (weakref to the mask, its version, (mask for SDPA, rows to zero or None))


def register() -> None:
    """Registers "fastnlg" with AttentionInterface (and its mask builder with AttentionMaskInterface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastnlg_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _window(sliding_window, is_causal=True):
    """Transformers' sliding window W as (left, right): causal, key j visible iff j > pos - W; bidirectional
    (ModernBERT's local layers, which pass their half-window + 1 as flash-attention's inclusive bound),
    iff |pos - j| < W."""
    if sliding_window is None or sliding_window <= 0:
        return None
    return (int(sliding_window) - 1, -1 if is_causal else int(sliding_window) - 1)


def _allowed(mask):
    """The bool form (True = attend) of a 4-D mask, bool or additive (0 = attend)."""
    return mask if mask.dtype == torch.bool else mask == 0


def _as_kernel_mask(mask, T, S, window, is_causal):
    """(causal, key_padding_mask or None) expressing the 4-D bool mask, or None if it cannot be expressed."""
    for ref, version, w, c, result in _cache:  # the same live tensor object (not just the same address)
        if ref() is mask and version == mask._version and w == window and c == is_causal:
            return result
    allowed = _allowed(mask)
    if allowed.shape[1] != 1:
        result = None
    else:
        allowed = allowed[:, 0]  # (B, T, S)
        kpm = allowed.any(dim=1)  # a key nobody may see is a padded (or windowed-out) key
        result = None
        for causal in ((True, False) if is_causal else (False, True)):
            want = visible_mask(T, S, causal=causal, window=window, device=mask.device, key_padding_mask=kpm)[:, 0]
            rows = want.any(-1)  # compare the rows that see a key
            if torch.equal(want & rows[..., None], allowed & rows[..., None]):
                result = (causal, None if bool(kpm.all()) else kpm)
                break
    _cache[:] = [e for e in _cache if e[0]() is not None][-7:]
    _cache.append((weakref.ref(mask), mask._version, window, is_causal, result))
    return result


def _sdpa_mask(mask, compiling):
    """(the bool mask SDPA runs under, the query rows to zero or None) for a 4-D mask (True or 0 = attend):
    a row that sees no key gets an all-true row (no NaN in forward or backward) and a zeroed output, as the
    spec says. Cached per mask tensor (all layers share it) until the mask is freed; on CPU, where the read
    costs no GPU sync, a mask without such rows is read once and skips the zeroing."""
    if not compiling:
        entry = _sdpa_cache.get(id(mask))
        if entry is not None and entry[0]() is mask and entry[1] == mask._version:
            return entry[2]
    allowed = _allowed(mask)
    empty = ~allowed.any(-1, keepdim=True)
    if compiling:
        return allowed | empty, empty
    result = (allowed | empty, empty if mask.device.type != "cpu" or bool(empty.any()) else None)
    key = id(mask)
    _sdpa_cache[key] = (weakref.ref(mask, lambda _ref: _sdpa_cache.pop(key, None)), mask._version, result)
    return result


def _masked(q, k, v, mask, scale, softcap, dropout_p, compiling=False):
    """Attention under a 4-D mask (B or 1, 1 or H, T, S), bool or additive: SDPA, as the unpatched model runs
    it (rows that see no key output 0), or the spec's attention where SDPA cannot (softcap)."""
    if softcap is not None:
        return masked_attention_reference(q, k, v, _allowed(mask), softmax_scale=scale, softcap=softcap,
                                          dropout_p=dropout_p)
    attn_mask, empty = _sdpa_mask(mask, compiling)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                           scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out if empty is None else out.masked_fill(empty, 0.0)


def _packed_cu_seqlens(mask, position_ids, window, T, S, is_causal):
    """cu_seqlens (int32, over the B*T tokens laid end to end) when the 4-D mask is exactly causal attention
    inside each packed sample - position ids restarting at 0, as fastnlg.train and Transformers' data
    collators with flattening pack them - else None. Verified against the mask; cached per mask tensor."""
    if position_ids is None or T != S or window is not None or not is_causal or mask.shape[1] != 1:
        return None
    B = mask.shape[0]
    if tuple(position_ids.shape) not in ((B, T), (1, T)):
        return None
    for ref, version, pid, result in _packed_cache:
        if ref() is mask and version == mask._version and pid() is position_ids:
            return result
    allowed = _allowed(mask)[:, 0]
    starts = position_ids == 0
    starts[:, 0] = True
    doc = starts.cumsum(-1)  # (B, T) sample number within the row
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    want = (doc[:, :, None] == doc[:, None, :]) & causal
    result = None
    if torch.equal(want.expand_as(allowed), allowed):
        idx = torch.nonzero(starts.expand(B, T).reshape(-1)).reshape(-1)
        result = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
    _packed_cache[:] = [e for e in _packed_cache if e[0]() is not None][-3:]
    _packed_cache.append((weakref.ref(mask), mask._version, weakref.ref(position_ids), result))
    return result


# Keyword arguments a layer may pass that change nothing here: position ids (read for packed batches), cache
# bookkeeping, flash-attention's varlen hints (the mask says the same), the loss's token count, flash flags.
IGNORED = frozenset({"position_ids", "use_cache", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                     "max_length_k", "num_items_in_batch", "output_hidden_states", "return_dict", "deterministic",
                     "layer_idx", "past_key_values", "past_key_value", "target_dtype"})
_read_cache: list = []  # [(weakref to a tensor, its version, the question, the answer)]


def _read_once(t, question, answer):
    """answer(t), a host read, once per live tensor and version (all layers share their mask and bias)."""
    for ref, version, q, result in _read_cache:
        if ref() is t and version == t._version and q == question:
            return result
    result = answer(t)
    _read_cache[:] = [e for e in _read_cache if e[0]() is not None][-7:]
    _read_cache.append((weakref.ref(t), t._version, question, result))
    return result


def _binary(mask) -> bool:
    """Whether a float mask only allows or forbids (0, or -inf / the dtype's minimum): the form the kernels and
    the bool SDPA mask represent; any other value is an additive bias. Read once per mask tensor."""
    return _read_once(mask, "binary", lambda m: bool(((m == 0) | (m <= torch.finfo(m.dtype).min / 2)).all()))


def _all_zero(bias) -> bool:
    """Whether a position_bias tensor is all zeros (T5's layers without a bias table pass one); read once."""
    return _read_once(bias, "zero", lambda b: not bool(b.any()))


class RelativePositionBias:
    """T5's relative position bias before it is computed: what T5Attention.compute_bias(query_length,
    key_length, past_seen_tokens=query_offset) would return, kept as the layer's table and bucket settings.
    fastnlg.patch makes T5's compute_bias return one (while the attention implementation is "fastnlg"); T5
    passes it on to the later layers as it does the tensor, and fastnlg's attention runs
    relative_position_attention on it, so the (1, H, T, S) bias is never built. `materialize()` builds it
    for the calls that need the tensor (the family's own attention, a mask the kernels cannot express)."""

    def __init__(self, table, *, bidirectional, num_buckets, max_distance, query_offset, query_length, key_length):
        self.table, self.bidirectional, self.num_buckets = table, bool(bidirectional), int(num_buckets)
        self.max_distance, self.query_offset = int(max_distance), int(query_offset)
        self.query_length, self.key_length = int(query_length), int(key_length)

    @classmethod
    def of(cls, module, query_length, key_length, past_seen_tokens=0):
        """The marker for a T5Attention with a bias table, or None where the tensor must be built: another
        attention implementation, or a cache length held in a tensor (a static cache) under torch.compile."""
        if getattr(module.config, "_attn_implementation", None) != NAME:
            return None
        if isinstance(past_seen_tokens, torch.Tensor):
            if torch.compiler.is_compiling():
                return None
            past_seen_tokens = int(past_seen_tokens)
        return cls(module.relative_attention_bias.weight, bidirectional=not module.is_decoder,
                   num_buckets=module.relative_attention_num_buckets,
                   max_distance=module.relative_attention_max_distance, query_offset=past_seen_tokens,
                   query_length=query_length, key_length=key_length)

    def materialize(self, T=None, S=None):
        """(1, H, T, S) in the table's dtype, as T5's compute_bias (T, S: the call's, default the marker's)."""
        return relative_position_bias(self.table, self.query_length if T is None else T,
                                      self.key_length if S is None else S, bidirectional=self.bidirectional,
                                      num_buckets=self.num_buckets, max_distance=self.max_distance,
                                      query_offset=self.query_offset)


def _biased_sdpa(query, key, value, mask, bias, scaling, dropout, is_causal):
    """Transformers' SDPA path for a position bias: SDPA under the float mask holding the bias where the
    mask allows and the dtype's minimum elsewhere (causal bottom-right when no mask is given)."""
    T, S = query.shape[2], key.shape[2]
    bias = bias.to(query.dtype)
    if mask is None and is_causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)[None, None]
    if mask is not None:
        bias = torch.where(_allowed(mask), bias, torch.finfo(query.dtype).min)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                            scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def _with_position_bias(module, query, key, value, mask, bias, scaling, dropout, is_causal):
    """Attention with T5's position bias (a RelativePositionBias, or a tensor) -> (B, Hq, T, D), or None when
    the bias is a tensor of zeros (the layer then runs as without one). relative_position_attention where the
    mask is causal / key padding and the cache offset agrees with it; otherwise SDPA with the bias added."""
    T, S = query.shape[2], key.shape[2]
    compiling = torch.compiler.is_compiling()
    if not isinstance(bias, RelativePositionBias):
        if not compiling and _all_zero(bias):
            return None
        if not compiling:  # (under torch.compile a tensor is not read: T5's zeros get added)
            _note(("position_bias tensor", type(module).__name__), f"{type(module).__name__} passes a position_bias "
                  "tensor (not fastnlg.patch's RelativePositionBias); those calls run SDPA with the bias added")
        return _biased_sdpa(query, key, value, mask, bias[..., :T, :S], scaling, dropout, is_causal)
    if mask is None:
        form = (bool(is_causal), None)
    else:
        form = None if compiling else _as_kernel_mask(mask, T, S, None, bool(is_causal))
    if form is not None and T == 1:  # one query row (decoding): bottom-right causal sees every key
        form = (False, form[1])
    if form is None or (form[0] and bias.query_offset != S - T):
        if not compiling:
            _note(("relative bias mask", type(module).__name__), f"{type(module).__name__}: a mask that is not "
                  "causal + key padding (or a cache offset it does not agree with); those calls run SDPA with "
                  "T5's bias built")
        return _biased_sdpa(query, key, value, mask, bias.materialize(T, S), scaling, dropout, is_causal)
    causal, kpm = form
    return relative_position_attention(query, key, value, bias.table, bidirectional=bias.bidirectional,
                                       num_buckets=bias.num_buckets, max_distance=bias.max_distance, causal=causal,
                                       key_padding_mask=kpm, softmax_scale=1.0 if scaling is None else scaling,
                                       query_offset=bias.query_offset, dropout_p=dropout)


def _note(key, message):
    if key not in _warned:
        _warned.add(key)
        logger.info("fastnlg attention: %s", message)


def fallback_reason(attention_mask, kwargs) -> str | None:
    """Why this call must run the model's own attention instead (an argument fastnlg's attention does not
    implement, or a mask it cannot represent), or None. Unknown arguments count: one added by a later
    Transformers version is never dropped silently."""
    for name, value in kwargs.items():
        if name not in IGNORED and value is not None and value is not False:
            return name
    if attention_mask is not None and attention_mask.is_floating_point() and (
            torch.compiler.is_compiling() or not _binary(attention_mask)):
        return "a float attention_mask with values other than 0 and -inf (an additive bias)"
    return None


def _own_attention(module, reason, *args, **kwargs):
    """The layer's modelling module's eager_attention_forward (its family's reference), warned once per reason
    and family; an error where the family has none (never a silently wrong result)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"fastnlg attention: {type(module).__name__} passes {reason}, which fastnlg's "
                                  "attention does not implement, and its module has no eager_attention_forward")
    key = (reason, type(module).__name__)
    if key not in _warned:
        _warned.add(key)
        logger.warning("fastnlg attention: %s passes %s; those calls run %s's own eager attention",
                       type(module).__name__, reason, type(module).__module__.rsplit(".", 1)[-1])
    query, key, value, mask, *rest = args
    T, S = query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    if mask is None and (getattr(module, "is_causal", True) if causal is None else causal) and T > 1:
        # SDPA's mask builder leaves out a plain causal mask (SDPA's is_causal); eager needs it (bottom-right)
        mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)[None, None]
    if mask is not None and mask.dtype == torch.bool:  # "fastnlg" builds SDPA's bool masks; eager adds a float one
        mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    return eager(module, query, key, value, mask, *rest, **kwargs)


def fastnlg_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """Transformers' attention-function contract: q (B, Hq, T, D), k/v (B, Hkv, S, D) ->
    ((B, T, Hq, D), None). A call with an argument it does not implement runs the family's own attention
    (fallback_reason). T5's `position_bias` runs relative_position_attention (_with_position_bias)."""
    position_bias = kwargs.pop("position_bias", None)
    reason = fallback_reason(attention_mask, kwargs)
    if reason is None and position_bias is not None and (softcap is not None or sliding_window is not None):
        reason = "position_bias with a softcap or a sliding window"
    if reason is not None:
        named = {k: v for k, v in (("scaling", scaling), ("dropout", dropout), ("sliding_window", sliding_window),
                                   ("softcap", softcap), ("is_causal", is_causal)) if v is not None}
        if position_bias is not None:
            named["position_bias"] = (position_bias.materialize(query.shape[2], key.shape[2])
                                      if isinstance(position_bias, RelativePositionBias) else position_bias)
        return _own_attention(module, reason, query, key, value, attention_mask, **named, **kwargs)
    T, S = query.shape[2], key.shape[2]
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = _window(sliding_window, bool(is_causal))
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] != S:
        attention_mask = attention_mask[:, :, :, :S]  # static caches build masks longer than the keys in use
    if attention_mask is None and is_causal and 1 < T < S:
        # no mask means SDPA's is_causal, which is top-left: query i sees keys 0..i (a static cache's prefill
        # over its allocated, still empty, slots); that is bottom-right causal over the first T keys
        key, value, S = key[:, :, :T], value[:, :, :T], T
    compiling = torch.compiler.is_compiling()
    dropout = dropout if module.training else 0.0
    if position_bias is not None:
        out = _with_position_bias(module, query, key, value, attention_mask, position_bias, scaling, dropout,
                                  is_causal)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and (compiling or _backend.choose("flash_attention", query, BACKENDS) == "torch"):
        # SDPA under the mask as given: the torch backend's own computation, and what a compiled graph runs
        # (the conversion below is verified on the host)
        out = _masked(query, key, value, attention_mask, scaling, softcap, dropout, compiling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None:
        form = (bool(is_causal), None)  # bottom-right causal: a single query row (decode) sees every key
    else:
        form = _as_kernel_mask(attention_mask, T, S, window, bool(is_causal))
    packed = None
    if form is None:
        packed = _packed_cu_seqlens(attention_mask, kwargs.get("position_ids"), window, T, S, bool(is_causal))
    if form is None and packed is not None:
        # a packed batch (position ids restarting at 0): the varlen kernel over the B*T tokens, no (T, T) mask
        B, Hq, _, D = query.shape

        def flat(t):
            return t.transpose(0, 1).reshape(1, t.shape[1], B * T, D)
        out = flash_attention(flat(query), flat(key), flat(value), causal=True, softmax_scale=scaling,
                              dropout_p=dropout, softcap=softcap, cu_seqlens=packed, max_seqlen=T)
        out = out.reshape(Hq, B, T, D).transpose(0, 1)
    elif form is None:
        if softcap is None:
            kind = (tuple(attention_mask.shape[1:2]), str(attention_mask.dtype), window)
            if kind not in _warned:
                _warned.add(kind)
                logger.info("fastnlg attention: this %s mask %s is not causal/window + key padding; running SDPA "
                            "under it", attention_mask.dtype, tuple(attention_mask.shape))
        out = _masked(query, key, value, attention_mask, scaling, softcap, dropout)
    else:
        causal, kpm = form
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, dropout_p=dropout,
                              window=window, softcap=softcap, key_padding_mask=kpm)
    return out.transpose(1, 2).contiguous(), None
