"""The single-process reference engine: schedule -> run -> postprocess.

It holds the whole model (attention part and every routed expert) in one process, on the CPU or
one GPU. The disaggregated runtime is checked token-for-token against it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from afsplit.block_manager import KVCacheManager
from afsplit.config import DTYPES as DTYPE_NAMES
from afsplit.config import Config
from afsplit.cuda_graphs import graph_buckets, graphs_wanted
from afsplit.errors import ConfigError, RequestError
from afsplit.piecewise_prefill import PiecewisePrefill
from afsplit.static_decode import StaticDecode
from afsplit.model_runner import KVCache, ModelRunner
from afsplit.models.checkpoint import CheckpointReader, RandomWeights
from afsplit.models.moe_model import AttentionModel, ExpertModel, LocalExperts
from afsplit.models.spec import ModelSpec, read_model_spec, spec_from_hf_config
from afsplit.models.weights import load_attention_weights, load_expert_weights
from afsplit.runtime.micro_batches import fixed_micro_batches
from afsplit.sampling_params import SamplingParams, derive_seed, token_ids_problem
from afsplit.scheduler import Scheduler
from afsplit.sequence import SeqStatus, SeqUpdate, Sequence
from afsplit.step_ahead import LaunchedStep, can_run_ahead, drop_placeholders, placeholders_for_ahead
from afsplit.warm_start import capture_every_bucket

log = logging.getLogger("afsplit")

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # model.dtype -> torch dtype


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    error: str | None = None  # set when this request was rejected; the others still complete


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over requests, or None when disabled or there is nothing to show."""
    if not (enabled and total):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)


def resolve_model(config: Config) -> tuple[ModelSpec, object]:
    """The model spec and a tensor source (checkpoint reader or random weights) for `config.model`."""
    m = config.model
    if m.path and m.tiny and not (Path(m.path) / "config.json").exists():
        from afsplit.models.tiny import make_tiny

        log.info("creating tiny %s checkpoint at %s", m.tiny, m.path)
        make_tiny(m.tiny, m.path, seed=m.seed)
    spec = model_spec(config)
    return spec, RandomWeights(seed=m.seed) if m.weights == "random" else CheckpointReader(m.path)


def replicas_need_ranks(config: Config) -> str:
    """Why balancer.replicas is refused by the single-process engine (and by check-config for one rank)."""
    return (f"{config.source}: balancer.replicas: {config.balancer.replicas!r} needs expert ranks: replicas work in "
            "the distributed runtime (a topology with attention and expert, or several colocated, ranks); the "
            "single-process engine holds every expert once, so set balancer.replicas: none")


def model_spec(config: Config) -> ModelSpec | None:
    """The spec `config.model` names: the checkpoint's config.json, else the preset (random weights); None when
    the checkpoint is not there (yet)."""
    m = config.model
    if m.path and (Path(m.path) / "config.json").exists():
        return read_model_spec(m.path)
    if m.weights == "random" and m.preset:
        from afsplit.models.presets import PRESETS

        return spec_from_hf_config(PRESETS[m.preset], f"preset {m.preset}")
    if m.path:
        return read_model_spec(m.path)  # raises the checkpoint error naming the path
    return None


def load_tokenizer(model_path: str):
    """The checkpoint's `tokenizers` tokenizer, or None when it has none (then only token ids are accepted)."""
    path = Path(model_path) / "tokenizer.json" if model_path else None
    if path is None or not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class LLMEngine:
    def __init__(self, config: Config, build_moe=None, device=None, micro_batches: int | None = None,
                 spec_and_source=None):
        """A runtime attention rank passes `build_moe(spec, source, dtype, device) -> MoEBackend` (instead
        of loading every expert locally), its device, its micro-batch count and the model it resolved."""
        self.config = config
        rt = config.runtime
        if device is None and config.topology.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{config.source}: topology.device: cuda but no CUDA device is visible "
                              f"(torch {torch.__version__}); use topology.device: cpu or a machine with a GPU")
        self.device = torch.device(device or ("cuda" if config.topology.device == "cuda" else "cpu"))
        self.dtype = DTYPES[config.model.dtype]
        self.spec, source = spec_and_source or resolve_model(config)
        spec = self.spec
        self.max_model_len = config.model.max_model_len or spec.max_position_embeddings
        if not rt.chunked_prefill and rt.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"{config.source}: runtime.max_num_batched_tokens: {rt.max_num_batched_tokens} < max_model_len "
                f"{self.max_model_len}; with chunked_prefill off it must hold a whole prompt")
        if build_moe is None and config.balancer.replicas != "none":
            raise ConfigError(replicas_need_ranks(config))
        attn_w = load_attention_weights(source, spec, self.dtype, self.device)
        self.model = AttentionModel(spec, attn_w, self.max_model_len, config.model.routing_skew)
        self.expert_stats = None
        if build_moe is None:
            if config.balancer.stats_path:
                from comm.expert_stats import ExpertStatsRecorder

                self.expert_stats = ExpertStatsRecorder(spec.num_moe_layers, spec.num_experts, 1, self.device)
            moe = LocalExperts(ExpertModel(load_expert_weights(source, spec, self.dtype, self.device)), self.expert_stats,
                           {layer: i for i, layer in enumerate(spec.moe_layer_ids)})
        else:
            moe = build_moe(spec, source, self.dtype, self.device)
        num_blocks = rt.num_kv_blocks or self._blocks_from_memory()
        self.kv = KVCacheManager(num_blocks, rt.block_size)
        self.kv_cache = KVCache(spec.num_layers, num_blocks, rt.block_size, spec.num_kv_heads, spec.head_dim,
                                self.dtype, self.device, latent=spec.mla is not None)
        self.scheduler = Scheduler(self.kv, rt.max_num_seqs, rt.max_num_batched_tokens, rt.chunked_prefill)
        static = None
        use_graphs, capture = graphs_wanted(rt.cuda_graphs and not rt.profile, self.device)
        if use_graphs and moe.graph_safe:
            static = StaticDecode(self.model, self.kv_cache, rt.block_size, self.max_model_len,
                                  graph_buckets(rt.max_num_seqs)[-1], moe, self.device, capture)
        elif use_graphs:
            log.info("cuda_graphs: off for this run: comm.metadata: counts reads row counts on the host every "
                     "layer (the default, padded, is captured with every transport, replicas and statistics)")
        piecewise = None
        m = micro_batches or fixed_micro_batches(rt.micro_batches, distributed=False)
        if use_graphs and rt.prefill_graphs and build_moe is None and m == 1:
            if PiecewisePrefill.supports(spec):
                piecewise = PiecewisePrefill(self.model, self.kv_cache, moe, self.device, capture,
                                             rt.max_num_batched_tokens)
            else:
                log.info("prefill_graphs: MLA prefill runs eagerly (piecewise graphs cover the GQA families)")
        self.runner = ModelRunner(self.model, self.kv_cache, rt.block_size, moe, self.device,
                                  micro_batches=m, max_batch=rt.max_num_seqs,
                                  max_tokens_per_rank=rt.max_num_batched_tokens, static=static, piecewise=piecewise)
        self.tokenizer = load_tokenizer(config.model.path)
        self._next_id = 0
        # launch the next decode step before reading this one (step_ahead.py); the distributed runtime's
        # attention ranks step in lockstep with the coordinator's plans and never do
        self.async_scheduling = rt.async_scheduling and build_moe is None
        self._ahead: LaunchedStep | None = None  # a step launched ahead, read by the next step()
        self.last_step = (0, 0)
        self.steps_run = 0
        self.warm_start = None  # what the warm start ran (afsplit/warm_start.py), None when it did not
        self._warm_startable = capture and build_moe is None  # graphs are captured, by this process alone
        if rt.capture_at_start:
            self.start_warm()

    def start_warm(self):
        """The warm start (afsplit/warm_start.py) where graphs are captured (a GPU, the single-process engine);
        runtime.capture_at_start runs it at the end of construction. A caller that wraps kernels which the
        graphs must capture (launch/engine_bench.py's expert counter) builds with it off, wraps, then calls
        this. Returns the report, or None where nothing is captured."""
        if self._warm_startable and self.warm_start is None:
            self.warm_start = capture_every_bucket(self)
        return self.warm_start

    def reset_counters(self) -> None:
        """Request ids, the step counter and expert statistics as a fresh engine's (after the warm start's
        synthetic requests: seeds derived from request ids and the first statistics dump stay the user's)."""
        if self.scheduler.has_work():
            raise RuntimeError("reset_counters: the engine has requests")
        self._next_id, self.steps_run, self.last_step = 0, 0, (0, 0)
        if self.expert_stats is not None:
            self.expert_stats.reset()

    def _blocks_from_memory(self) -> int:
        s, rt = self.spec, self.config.runtime
        per_block = KVCache.bytes_per_block(s.num_layers, rt.block_size, s.num_kv_heads, s.head_dim, self.dtype,
                                            latent=s.mla is not None)
        return max(1, int(rt.kv_cache_memory_gb * 2**30) // per_block)

    # -- requests ------------------------------------------------------------------------------

    def tokenize(self, prompt, where: str = "request") -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt: a string, or {'prompt_token_ids': [...]} / {'prompt': text}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                problem = token_ids_problem("prompt_token_ids", ids, None)
                if problem:
                    raise RequestError(f"{where}: {problem}")
                return None, ids
            prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(f"{where}: a prompt must be a string or {{'prompt_token_ids': [...]}}, "
                               f"got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise RequestError(f"{where}: {self.config.model.path or 'this model'} has no tokenizer.json; "
                               "pass prompt_token_ids")
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def add_request(self, prompt, params: SamplingParams) -> Sequence:
        """Validate and queue one request; raises RequestError (naming the problem) if it is bad."""
        seq = self.make_sequence(prompt, params)
        self.scheduler.add(seq)
        return seq

    def make_sequence(self, prompt, params: SamplingParams, where: str | None = None,
                      index: int | None = None) -> Sequence:
        """Validate and tokenize one request into a Sequence (not queued); raises RequestError.

        This is the one admission check of every entry point (API, CLI, distributed coordinator).
        `where` names the request in errors (e.g. "prompts.jsonl line 4"); `index` is its position in
        the caller's input, from which the sampling seed is derived when the request gives none.
        """
        request_id = self._next_id
        self._next_id += 1
        where = where or f"request {request_id}"
        if not isinstance(params, SamplingParams):
            raise RequestError(f"{where}: sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate(where, self.spec.vocab_size)
        text, ids = self.tokenize(prompt, where)
        if not ids:
            raise RequestError(f"{where}: empty prompt; give at least one token")
        problem = token_ids_problem("prompt", ids, self.spec.vocab_size)
        if problem:
            raise RequestError(f"{where}: {problem}")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"{where}: prompt has {len(ids)} tokens, max_model_len is {self.max_model_len}; shorten it or raise model.max_model_len")
        worst = self.kv.blocks_for(min(len(ids) + params.max_tokens, self.max_model_len))
        if worst > self.kv.allocator.num_blocks:
            raise RequestError(
                f"{where}: needs up to {worst} KV blocks but the cache has {self.kv.allocator.num_blocks}; "
                "lower max_tokens or raise runtime.num_kv_blocks")
        index = request_id if index is None else index
        seed = params.seed if params.seed is not None else derive_seed(self.config.runtime.seed, index)
        return Sequence(request_id, ids, params, seed, prompt_text=text, arrival_time=time.time())

    # -- the engine step -----------------------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a request made by `make_sequence` (it joins the running batch at the next step)."""
        self.scheduler.add(seq)

    def abort_request(self, request_id: int) -> bool:
        """Stop a request and free its KV blocks now; False if it is not here (finished or unknown)."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            drop_placeholders(seq)
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()  # a step ahead computes only running requests

    def step(self, lockstep: bool = False) -> list[SeqUpdate]:
        """One forward pass: schedule -> run -> postprocess. Returns what each sampling request produced.

        With `lockstep` (a runtime attention rank) the forward runs even with nothing scheduled, so
        this rank joins every MoE collective of the step with zero tokens. With
        runtime.async_scheduling the next decode step may be launched before this one is read
        (afsplit/step_ahead.py); it is read by the next call.
        """
        launched, self._ahead = self._ahead, None
        if launched is not None and all(s.status is SeqStatus.FINISHED for s in launched.seqs):
            launched = None  # every request it computes has ended or was aborted: nothing to read (the stream
            # orders its KV writes before any later step's, so its freed blocks can be reused)
        if launched is None:
            batch = self.scheduler.schedule()
            if not batch.seqs and not lockstep:
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress (KV cache too small for any waiting request)")
                return []
            launched = self._launch(batch)
        if self.async_scheduling and not lockstep:
            self._ahead = self._launch_ahead(launched)
        return self._read(launched)

    def _launch(self, batch, feed=None) -> LaunchedStep:
        logits, sampling = self.runner.run(batch, feed)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
        return LaunchedStep.launched(batch, sampling, logits, self.runner.last_static)

    def _launch_ahead(self, launched: LaunchedStep) -> LaunchedStep | None:
        """The next step, launched now when it can only be decodes of the same sequences (step_ahead.py)."""
        sch = self.scheduler
        if not can_run_ahead(sch.running, len(sch.waiting), sch.max_num_seqs, self.max_model_len):
            return None  # a waiting request may join the next step: schedule it once this one is read
        feed = placeholders_for_ahead(launched, sch.running, self.max_model_len)
        if feed is None:
            return None
        batch = sch.schedule(admit=False)
        return self._launch(batch, (launched.tokens, feed)) if batch.seqs else None

    def _read(self, launched: LaunchedStep) -> list[SeqUpdate]:
        """Read a launched step's tokens and finish what they end."""
        batch = launched.batch
        self.last_step = (batch.total_tokens, sum(1 for n in batch.num_tokens if n == 1))  # tokens, decodes
        new_tokens = launched.read_tokens()
        now = time.time()
        updates = []
        for seq, slot, token in zip(launched.seqs, launched.slots, new_tokens):
            if seq.status is SeqStatus.FINISHED:  # ended by the step before, or aborted: its row is dropped
                continue
            if slot < len(seq.output_token_ids):  # the placeholder a step launched ahead gave it
                seq.output_token_ids[slot] = token
            else:
                seq.output_token_ids.append(token)
            seq.token_times.append(now)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
            updates.append(SeqUpdate(seq.request_id, [token], reason, now))
        self.steps_run += 1
        every = self.config.balancer.stats_every_steps
        if self.expert_stats is not None and every and self.steps_run % every == 0:
            self.expert_stats.dump(self.config.balancer.stats_path)
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.spec.eos_token_ids):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""

    def request_output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt_text, prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(0, self.detokenize(seq.output_token_ids), list(seq.output_token_ids),
                                      seq.finish_reason)], error=seq.error)

    def admit(self, prompts: list, params: SamplingParams | list[SamplingParams], labels: list[str] | None = None,
              indices: list[int] | None = None):
        """Validate every request: (results with the bad ones' errors filled in, good Sequences, request id -> position).

        `params` is one SamplingParams for all prompts or a list of exactly one per prompt (else ValueError).
        `labels[i]` names prompt i in its error (default "request i"); `indices[i]` is its index in
        the caller's input, for seed derivation (default i).
        """
        n = len(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != n:
                raise ValueError(f"got {n} prompts but {len(params)} SamplingParams; pass one SamplingParams "
                                 "for all prompts or a list with one per prompt")
            params_list = list(params)
        else:
            params_list = [params] * n
        labels = labels if labels is not None else [f"request {i}" for i in range(n)]
        indices = indices if indices is not None else list(range(n))
        results: list[RequestOutput | None] = [None] * n
        seqs, index = [], {}
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            try:
                seq = self.make_sequence(prompt, p, where=labels[i], index=indices[i])
            except RequestError as e:
                results[i] = RequestOutput(request_id=-1, prompt=prompt if isinstance(prompt, str) else None,
                                           prompt_token_ids=[], error=str(e))
                log.debug("%s", e)  # the caller reports it (the CLI prints it once)
                continue
            seqs.append(seq)
            index[seq.request_id] = i
        return results, seqs, index

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams], use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; a bad request gets `.error` set and the others complete."""
        results = run_to_completion(self, self, prompts, params, use_tqdm)
        if self.expert_stats is not None:
            self.expert_stats.dump(self.config.balancer.stats_path)
            log.info("expert activation counts appended to %s", self.config.balancer.stats_path)
        return results


def run_to_completion(core, engine: LLMEngine, prompts: list, params, use_tqdm: bool = True,
                      on_finished=None, labels: list[str] | None = None,
                      indices: list[int] | None = None) -> list[RequestOutput]:
    """Drive an engine core (the single-process LLMEngine or the runtime's Coordinator: anything with
    add_sequence / abort_request / step / has_unfinished_requests) until every request of `prompts` is done.

    `engine` validates, tokenizes and detokenizes (see LLMEngine.admit for `labels` and `indices`).
    Returns one RequestOutput per prompt, in order; `on_finished(position, output)` is called as each
    request finishes (or fails validation). If anything raises meanwhile (a callback, Ctrl-C, a
    failed step), this call's unfinished requests are aborted first, so the core is usable again.
    """
    results, seqs, index = engine.admit(prompts, params, labels, indices)
    by_id = {seq.request_id: seq for seq in seqs}
    for seq in seqs:
        core.add_sequence(seq)
    bar = progress_bar(len(seqs), use_tqdm)
    try:
        if on_finished is not None:
            for i, out in enumerate(results):
                if out is not None:
                    on_finished(i, out)
        while core.has_unfinished_requests():
            for upd in core.step():
                if upd.finish_reason is None or upd.request_id not in index:
                    continue
                i = index[upd.request_id]
                results[i] = engine.request_output(by_id[upd.request_id])
                if on_finished is not None:
                    on_finished(i, results[i])
                if bar:
                    bar.update(1)
    except BaseException:
        for seq in seqs:
            if results[index[seq.request_id]] is None:
                core.abort_request(seq.request_id)
        raise
    finally:
        if bar:
            bar.close()
    return results


class MeasuredCore:
    """The single-process engine as an engine core that also records RunStats, as the coordinator
    does for the distributed runtime (what `afsplit generate --stats-json` writes in either layout)."""

    def __init__(self, engine: LLMEngine):
        from afsplit.runtime.stats import RunStats

        self.engine = engine
        self.stats = RunStats(world_size=1, num_moe_layers=engine.spec.num_moe_layers)
        self.stats.ranks = {"attention": 1, "expert": 0}
        self._seqs: dict[int, Sequence] = {}
        self._start = None

    def add_sequence(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self.engine.add_sequence(seq)

    def abort_request(self, request_id: int) -> bool:
        self._seqs.pop(request_id, None)
        return self.engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[SeqUpdate]:
        if self._start is None:
            self._start = time.perf_counter()
        start = time.perf_counter()
        updates = self.engine.step()
        step_s = time.perf_counter() - start
        stats = self.stats
        stats.steps += 1
        m = self.engine.runner.micro_batches
        stats.micro_batches[m] = stats.micro_batches.get(m, 0) + 1
        tokens, decodes = self.engine.last_step
        if tokens and tokens == decodes:
            stats.decode_step_s.append(step_s)
        for upd in updates:
            seq = self._seqs.pop(upd.request_id, None) if upd.finish_reason else None
            if seq is not None and upd.finish_reason != "abort":
                stats.generated_tokens += len(seq.output_token_ids)
                stats.prompt_tokens += len(seq.prompt_token_ids)
                stats.requests.append(seq.latency_metrics())
        stats.wall_s = time.perf_counter() - self._start
        return updates
