"""SGLang's HTTP protocol, written once for the two test doubles that speak it.

The stand-in (:mod:`treegrpo.testing.sglang_standin`, a real model) and the simulator
(:mod:`treegrpo.testing.sglang_sim`, no model, simulated time) answer the same requests the same
way; what they share lives here: the ``sampling_params`` keys SGLang takes, reading and checking a
``/generate`` body into a typed :class:`GenerateCall`, the ``meta_info`` and answer bodies, the
error shapes and the bodies of the information endpoints (``/model_info``, ``/server_info``);
and two rules of SGLang's server that the stand-in applies (:func:`check_input_ids`, how a real
server fails on token ids it does not check; :func:`matched_stop_string`, its stop-string rule).
The contract itself is ``sglang.md``.

This module is for the doubles only: it never imports the client it helps test
(``treegrpo.engine``), so a test of the client against a double checks the client against an
independent reading of the protocol. The client and the embedded engine have their own
versions of the two rules (``treegrpo.engine.tokens``, ``treegrpo.engine.stops``): these are
written apart from them, plainly, and ``tests/test_sglang_rules.py`` checks each against the
other on random inputs.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = [
    "ENDPOINTS",
    "PAUSE_MODES",
    "SAMPLING_KEYS",
    "BadRequest",
    "GenerateCall",
    "InternalError",
    "Sampling",
    "answer_body",
    "application",
    "check_context",
    "check_input_ids",
    "check_sampling_keys",
    "control",
    "error",
    "internal_error",
    "json_body",
    "matched_stop_string",
    "meta_info",
    "model_info",
    "parse_abort",
    "parse_generate",
    "parse_sampling",
    "pause_mode",
    "request_json",
    "rids_of",
    "server_info",
]

# SGLang's SamplingParams arguments: any other key is a TypeError (HTTP 500) there.
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "stop",
        "stop_token_ids",
        "stop_regex",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "min_new_tokens",
        "n",
        "json_schema",
        "regex",
        "ebnf",
        "structural_tag",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "no_stop_trim",
        "custom_params",
        "stream_interval",
        "logit_bias",
        "sampling_seed",
    }
)


class BadRequest(Exception):
    """An HTTP 400 ``{"error": {"message": ...}}``."""


class InternalError(Exception):
    """What a real SGLang server does not check and fails on (a bare HTTP 500 here)."""


# --------------------------------------------------------------------------- endpoints

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# SGLang's HTTP endpoints that treegrpo uses, as (method, path, name): a double serves the ones
# it has a handler of that name for. The /get_... paths are the older names of the info ones.
ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    ("POST", "/generate", "generate"),
    ("POST", "/abort_request", "abort_request"),
    ("POST", "/pause_generation", "pause_generation"),
    ("POST", "/continue_generation", "continue_generation"),
    ("POST", "/update_weights_from_disk", "update_weights_from_disk"),
    ("POST", "/init_weights_update_group", "init_weights_update_group"),
    ("POST", "/update_weights_from_distributed", "update_weights_from_distributed"),
    ("POST", "/destroy_weights_update_group", "destroy_weights_update_group"),
    ("POST", "/get_weights_by_name", "get_weights_by_name"),
    ("GET", "/get_weights_by_name", "get_weights_by_name"),
    ("POST", "/flush_cache", "flush_cache"),
    ("GET", "/flush_cache", "flush_cache"),
    ("GET", "/health", "health"),
    ("GET", "/health_generate", "health_generate"),
    ("GET", "/model_info", "model_info"),
    ("GET", "/get_model_info", "model_info"),
    ("GET", "/server_info", "server_info"),
    ("GET", "/get_server_info", "server_info"),
)


def application(
    handlers: Mapping[str, Handler], extra: Sequence[tuple[str, str, Handler]] = ()
) -> web.Application:
    """An aiohttp application serving each of :data:`ENDPOINTS` that ``handlers`` (by name)
    has a handler for (the others answer 404), and the ``extra`` (method, path, handler)
    routes of the double's own."""
    unknown = sorted(set(handlers) - {name for _, _, name in ENDPOINTS})
    if unknown:
        raise ValueError(f"no SGLang endpoint is named {unknown[0]!r}")
    app = web.Application(client_max_size=64 * 1024**2)
    for method, path, name in ENDPOINTS:
        if name in handlers:
            app.router.add_route(method, path, handlers[name])
    for method, path, handler in extra:
        app.router.add_route(method, path, handler)
    return app


# --------------------------------------------------------------------------- /generate


@dataclass(frozen=True)
class Sampling:
    """One prompt's ``sampling_params``, checked (SGLang's defaults where left out)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    no_stop_trim: bool
    ignore_eos: bool
    n: int


@dataclass(frozen=True)
class GenerateCall:
    """A checked ``/generate`` body: one entry per prompt, prompt-major.

    ``single``: the body held one prompt (not a batch), so the answer is one object when
    ``n == 1``; ``per_prompt_sampling``: ``sampling_params`` was a list."""

    prompts: list[list[int]]
    single: bool
    sampling: list[Sampling]
    rids: list[str]
    return_logprob: list[bool]
    per_prompt_sampling: bool

    @property
    def answers_one(self) -> bool:
        """The answer is one JSON object rather than an array."""
        return self.single and self.sampling[0].n == 1


def check_sampling_keys(raw: Mapping[str, Any]) -> None:
    """SGLang builds ``SamplingParams(**sampling_params)``: an unknown key is an uncaught
    TypeError, which its HTTP server answers with a bare 500."""
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise TypeError(
            f"SamplingParams.__init__() got an unexpected keyword argument {unknown[0]!r}"
        )


def parse_sampling(
    raw: Any, *, not_emulated: Mapping[str, Any] | None = None, server: str = "the server"
) -> Sampling:
    """Check one ``sampling_params`` object as SGLang does (raises :class:`BadRequest`, or
    TypeError for an unknown key). ``not_emulated``: keys the double takes but does not
    emulate, with their neutral values; any other value of one is a 400 naming ``server``."""
    if not isinstance(raw, dict):
        raise BadRequest("sampling_params must be an object (or a list of objects)")
    check_sampling_keys(raw)
    for key, default in (not_emulated or {}).items():
        if raw.get(key, default) != default:
            raise BadRequest(
                f"{server} does not emulate sampling_params.{key} (SGLang does): "
                "leave it out in tests"
            )

    def number(key: str, default: float) -> float:
        value = raw.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{key} must be a number, got {value!r}")
        return float(value)

    max_new_tokens = raw.get("max_new_tokens", 128)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise BadRequest(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
    temperature = number("temperature", 1.0)
    if temperature < 0:
        raise BadRequest(f"temperature must be non-negative, got {temperature}.")
    top_p = number("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    top_k = raw.get("top_k", -1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or (top_k < 1 and top_k != -1):
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    n = raw.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadRequest(f"n must be at least 1, got {n!r}.")
    stop = raw.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    stop_ids = raw.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise BadRequest("stop_token_ids must be a list of token ids")
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
        no_stop_trim=bool(raw.get("no_stop_trim", False)),
        ignore_eos=bool(raw.get("ignore_eos", False)),
        n=n,
    )


def rids_of(rid: Any, count: int, single: bool) -> list[str]:
    """The request ids of ``count`` prompts: fresh ones without ``rid``; a string names the one
    prompt, or is suffixed ``_i`` per prompt of a batch; a list names each prompt."""
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        return [rid] if single else [f"{rid}_{i}" for i in range(count)]
    if isinstance(rid, list) and all(isinstance(r, str) for r in rid):
        if len(rid) != count:
            raise BadRequest(f"{len(rid)} rids for {count} prompts")
        return list(rid)
    raise BadRequest("rid must be a string or a list of strings")


def check_context(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    """SGLang's two context checks: the prompt alone, then prompt + ``max_new_tokens``."""
    if prompt_len >= context_length:
        raise BadRequest(
            f"The input ({prompt_len} tokens) is longer than the model's context "
            f"length ({context_length} tokens)."
        )
    if prompt_len + max_new_tokens >= context_length:
        raise BadRequest(
            f"Requested token count exceeds the model's maximum context length of "
            f"{context_length} tokens: {prompt_len} input tokens + "
            f"{max_new_tokens} max_new_tokens. Lower max_new_tokens or shorten the "
            "input."
        )


def check_input_ids(k: int, prompt: Sequence[Any], vocab_size: int, *, note: str = "") -> None:
    """What a real SGLang server does with prompt ``k``'s ``input_ids`` (the JSON values of a
    request body), as a double answers it.

    SGLang does not check token ids (sglang.md): its scheduler indexes the embedding with them,
    so an id at or beyond ``vocab_size``, or a negative one, crashes or fails it: an
    :class:`InternalError` (a bare HTTP 500) here, naming the position and the bound, with
    ``note`` after the bound. A value that is not an integer (a float, a string, a bool,
    ``null``, a list) is a :class:`BadRequest` (HTTP 400). The first bad value decides.
    """
    for pos, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, int):
            raise BadRequest(f"prompt {k}: input_ids[{pos}] is {token!r}, not an int token id")
        if token < 0 or token >= vocab_size:
            raise InternalError(
                f"prompt {k}: input_ids[{pos}] = {token} is outside the vocabulary "
                f"[0, {vocab_size}){note}"
            )


def matched_stop_string(
    output_ids: Sequence[int], stops: Sequence[str], decode: Callable[[list[int]], str]
) -> str | None:
    """SGLang's stop-string rule, checked after each new token: the stop string that ends the
    request now, or None.

    SGLang checks a request after every token it generates (length, then stop token ids, then
    stop strings) and finishes it with ``finish_reason.matched`` = the first stop string *of the
    request's list* that the decoded output holds; the tokens through the one that completed it
    stay in ``output_ids``. Here the whole output is decoded each time (``decode(ids)``: the
    tokenizer's text of the ids, special tokens kept): slower than SGLang's decoding of the last
    few tokens, and plainly right. Empty stop strings never match.
    """
    if not output_ids:
        return None
    text = decode(list(output_ids))
    for stop in stops:
        if stop != "" and stop in text:
            return stop
    return None


def parse_generate(
    body: Any,
    *,
    server: str,
    tokenize: Callable[[Any], list[Any]],
    check_prompt: Callable[[int, list[Any]], None],
    context_length: int,
    in_flight: set[str] | frozenset[str],
    not_emulated: Mapping[str, Any] | None = None,
) -> GenerateCall:
    """Check a ``/generate`` body (raises :class:`BadRequest`, TypeError for an unknown
    sampling key, or what ``check_prompt`` raises).

    ``server`` names the double in its refusals; ``tokenize(text)`` turns ``text`` (a string
    or a list of them) into ``input_ids`` (or raises :class:`BadRequest`);
    ``check_prompt(k, prompt)`` checks prompt ``k``'s token ids; ``in_flight``: the rids
    running now (a duplicate is a 400)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("stream"):
        raise BadRequest(f"{server} does not stream: send stream=false")
    if body.get("input_ids") is None and body.get("text") is None:
        raise BadRequest("either text or input_ids should be provided")
    raw = body.get("input_ids")
    if raw is None:
        raw = tokenize(body["text"])
    single = bool(raw) and not isinstance(raw[0], list)
    prompts = [raw] if single else raw
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("input_ids must be a non-empty list of token ids or of lists")
    for k, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("every prompt must be a non-empty list of token ids")
        check_prompt(k, prompt)
    sampling = body.get("sampling_params") or {}
    per_prompt = isinstance(sampling, list)
    sampling_list = sampling if per_prompt else [sampling] * len(prompts)
    if len(sampling_list) != len(prompts):
        raise BadRequest(f"{len(sampling_list)} sampling_params for {len(prompts)} prompts")
    params = [parse_sampling(s, not_emulated=not_emulated, server=server) for s in sampling_list]
    for prompt, p in zip(prompts, params, strict=True):
        check_context(len(prompt), p.max_new_tokens, context_length)
    rids = rids_of(body.get("rid"), len(prompts), single)
    for rid in rids:
        if rid in in_flight:
            raise BadRequest(f"Duplicate request ID detected: {rid}")
    if len(set(rids)) != len(rids):
        raise BadRequest("rid holds duplicate request IDs")
    return_logprob = body.get("return_logprob", False)
    flags = return_logprob if isinstance(return_logprob, list) else [return_logprob] * len(rids)
    return GenerateCall(
        prompts=[list(p) for p in prompts],
        single=single,
        sampling=params,
        rids=rids,
        return_logprob=[bool(f) for f in flags],
        per_prompt_sampling=per_prompt,
    )


def meta_info(
    *,
    id: str,
    finish_reason: dict[str, Any],
    prompt_tokens: int,
    output_ids: Sequence[int],
    cached_tokens: int,
    weight_version: str,
    e2e_latency: float,
    output_log_probs: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One sample's ``meta_info``; with ``output_log_probs`` (``return_logprob``), also
    ``output_token_logprobs`` as ``[logprob, token_id, null]`` (and empty input ones)."""
    meta: dict[str, Any] = {
        "id": id,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(output_ids),
        "cached_tokens": cached_tokens,
        "weight_version": weight_version,
        "e2e_latency": e2e_latency,
    }
    if output_log_probs is not None:
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [
            [lp, t, None] for lp, t in zip(output_log_probs, output_ids, strict=True)
        ]
    return meta


def answer_body(
    output_ids: Sequence[int], meta: dict[str, Any], text: str | None = None
) -> dict[str, Any]:
    """One sample's answer, shaped like SGLang's non-streaming ``/generate`` (no ``text``
    under ``--skip-tokenizer-init``: ``text=None``)."""
    answer: dict[str, Any] = {}
    if text is not None:
        answer["text"] = text
    answer["output_ids"] = list(output_ids)
    answer["meta_info"] = meta
    return answer


# --------------------------------------------------------------------------- control


def parse_abort(body: Mapping[str, Any]) -> tuple[bool, str]:
    """``/abort_request``'s body: ``(abort_all, rid)``. Without ``abort_all``, every request
    whose id starts with ``rid`` is aborted (a prefix match, as SGLang's scheduler does); an
    empty ``rid`` aborts nothing. A rid that is not a string is a :class:`BadRequest`."""
    rid = body.get("rid", "")
    if not isinstance(rid, str):
        raise BadRequest("rid must be a string")
    return bool(body.get("abort_all")), rid


PAUSE_MODES = ("abort", "retract", "in_place")


def pause_mode(body: Mapping[str, Any]) -> str:
    """``/pause_generation``'s ``mode`` (default ``abort``: abort everything running;
    ``retract`` and ``in_place`` hold it); another is a :class:`BadRequest`."""
    mode = body.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise BadRequest(f"mode must be abort, retract or in_place, got {mode!r}")
    return str(mode)


# --------------------------------------------------------------------------- information


def model_info(model_path: str, weight_version: str, **extra: Any) -> web.Response:
    """``/model_info`` (and ``/get_model_info``); ``extra`` adds keys."""
    return web.json_response(
        {
            "model_path": model_path,
            "tokenizer_path": model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": weight_version,
            **extra,
        }
    )


def server_info(
    *,
    model_path: str,
    page_size: int,
    schedule_policy: str,
    skip_tokenizer_init: bool,
    context_length: int,
    max_total_num_tokens: int,
    weight_version: str,
    version: str,
    **extra: Any,
) -> web.Response:
    """``/server_info`` (and ``/get_server_info``): the fields treegrpo reads; ``extra`` adds
    keys."""
    return web.json_response(
        {
            "model_path": model_path,
            "tokenizer_path": model_path,
            "page_size": page_size,
            "schedule_policy": schedule_policy,
            "skip_tokenizer_init": skip_tokenizer_init,
            "context_length": context_length,
            "max_total_num_tokens": max_total_num_tokens,
            "weight_version": weight_version,
            "version": version,
            **extra,
        }
    )


# --------------------------------------------------------------------------- bodies and errors


async def request_json(request: web.Request) -> Any:
    """The request's JSON body (raises :class:`BadRequest` if it is not JSON)."""
    try:
        return await request.json()
    except ValueError as e:
        raise BadRequest(f"body must be JSON ({e})") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    """A control endpoint's JSON object body; ``{}`` where it is absent or not an object."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def error(status: int, message: str) -> web.Response:
    """SGLang's error shape: ``{"error": {"message": ...}}``."""
    return web.json_response({"error": {"message": message}}, status=status)


def internal_error(e: BaseException) -> web.Response:
    """A bare HTTP 500, as SGLang's server answers an uncaught exception."""
    return web.Response(status=500, text=f"Internal Server Error ({e})")


def control(success: bool, message: str) -> web.Response:
    """A control endpoint's answer: ``{"success", "message"}``, HTTP 400 on failure."""
    return web.json_response(
        {"success": success, "message": message}, status=200 if success else 400
    )
