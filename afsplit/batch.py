"""`afsplit generate`'s batch job: the prompts file in, one result line per request out.

* Input: a JSON lines file, one request per line (``prompt`` or ``prompt_token_ids`` plus optional
  sampling fields), or one ``--prompt``. Request ``index`` = its position among the file's
  non-blank lines (0-based); errors name the file line (``prompts.jsonl line 4: ...``). A line that
  is not a JSON object, has unknown fields or (later, at admission) a bad field fails alone.
* Output (``--output``): one JSON line per request with its ``index``, appended and flushed as the
  request finishes, so a run that dies late keeps what it finished; at the end of a complete run
  the file is rewritten in index order. ``--resume`` skips indices already in the file (their seeds
  are derived from the index, so the tokens are what a single run would have produced).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from afsplit.errors import AfsplitError, RequestError

REQUEST_KEYS = {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
                "stop_token_ids"}
SAMPLING_KEYS = REQUEST_KEYS - {"prompt", "prompt_token_ids"}


@dataclass
class InputRequest:
    index: int  # position in the input (what the output's "index" and the derived seed use)
    label: str  # how errors name it, e.g. "prompts.jsonl line 4"
    fields: dict | None  # the request (CLI defaults filled in), or None when the line itself is bad
    error: str | None = None


def read_requests(path: str, defaults: dict) -> list[InputRequest]:
    """Parse a JSONL prompts file; a malformed line becomes an InputRequest with `error` set."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RequestError(f"{path}: cannot read prompts file ({e.strerror}); check the path") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"{path}: not UTF-8 text ({e.reason}); the prompts file must be JSON lines") from None
    out: list[InputRequest] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        req = InputRequest(len(out), f"{path} line {n}", None)
        out.append(req)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            req.error = f"{req.label}: not valid JSON ({e.msg}); each line must be one JSON object"
            continue
        if not isinstance(obj, dict) or not ({"prompt", "prompt_token_ids"} & obj.keys()):
            req.error = f"{req.label}: expected a JSON object with 'prompt' or 'prompt_token_ids'"
            continue
        unknown = set(obj) - REQUEST_KEYS
        if unknown:
            req.error = f"{req.label}: unknown field(s) {sorted(unknown)}; valid: {sorted(REQUEST_KEYS)}"
            continue
        req.fields = {**defaults, **obj}
    return out


def check_writable(path: str, flag: str) -> None:
    """Fail now (not after the run) when `path` cannot be written; leaves no file behind."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise AfsplitError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if os.path.isdir(path):
        raise AfsplitError(f"{flag} {path}: is a directory; give a file path")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise AfsplitError(f"{flag} {path}: cannot write ({e.strerror})") from None
    if not existed:
        os.remove(path)


def read_output(path: str, num_requests: int, prompts_file: str) -> tuple[dict[int, dict], list[str]]:
    """The records already in an output file (index -> record) and warnings about lines dropped
    (a line cut short by a crash is dropped: its request runs again)."""
    if not os.path.exists(path):
        return {}, []
    records, warnings = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            index = rec["index"]
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            warnings.append(f"{path} line {n}: not a complete result record; dropped, its request runs again")
            continue
        if not 0 <= index < num_requests:
            raise AfsplitError(f"--resume: {path} line {n} has index {index} but {prompts_file} has {num_requests} "
                               "requests; resume with the prompts file that made it, or write a new --output")
        records[index] = rec
    return records, warnings


class BatchJob:
    """Turns the CLI's input into engine requests and streams their results to --output."""

    def __init__(self, args, defaults: dict, warn: bool = True):
        self.output = args.output
        self.err = sys.stderr
        source = args.prompts_file or "--prompt"
        if args.prompt is not None:
            self.inputs = [InputRequest(0, "--prompt", {**defaults, "prompt": args.prompt})]
        else:
            self.inputs = read_requests(args.prompts_file, defaults)
        self.done: dict[int, dict] = {}  # records kept from the output being resumed (dropped once rewritten)
        if args.resume:
            self.done, warnings = read_output(self.output, len(self.inputs), source)
            for w in warnings if warn else ():
                print(f"afsplit: warning: {w}", file=self.err)
        self.failed = {i for i, r in self.done.items() if "error" in r}  # indices with an error record
        self.texts: dict[int, str] = {}  # without --output: what is printed at the end
        self.pending = [r for r in self.inputs if r.index not in self.done]
        # a pipe or device (--output /dev/stdout) is streamed to but never rewritten
        self._regular = bool(self.output) and (not os.path.exists(self.output) or os.path.isfile(self.output))
        if args.resume and not self._regular:
            raise AfsplitError(f"--resume: --output {self.output} is not a regular file")
        self._indices: list[int] = []
        self._file = None

    # -- engine requests -------------------------------------------------------------------------

    def engine_requests(self):
        """(prompts, params, labels, indices) of the requests this run computes (bad lines excluded)."""
        from afsplit.sampling_params import SamplingParams

        prompts, params, labels, indices = [], [], [], []
        for r in self.pending:
            if r.fields is None:
                continue
            f = r.fields
            prompts.append({"prompt_token_ids": f["prompt_token_ids"]} if "prompt_token_ids" in f else f["prompt"])
            params.append(SamplingParams(**{k: f[k] for k in SAMPLING_KEYS if k in f}))
            labels.append(r.label)
            indices.append(r.index)
        self._indices = indices
        return prompts, params, labels, indices

    # -- results -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Start the output file: keep the records being resumed, append from here on."""
        if self.output:
            if self._regular:
                _write_records(self.output, self.done)
            self.done = {}  # on disk now; results are not kept in memory (a job may have millions)
            self._file = open(self.output, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        for r in self.pending:  # lines that never reach the engine fail now, in input order
            if r.error is not None:
                self._record({"index": r.index, "error": r.error})

    def on_finished(self, position: int, out) -> None:
        """run_to_completion's callback; `position` indexes this run's engine requests."""
        index = self._indices[position]
        if out.error:
            self._record({"index": index, "error": out.error})
        else:
            c = out.outputs[0]
            self._record({"index": index, "prompt": out.prompt, "token_ids": c.token_ids, "text": c.text,
                          "finish_reason": c.finish_reason})

    def _record(self, rec: dict) -> None:
        if "error" in rec:
            self.failed.add(rec["index"])
            print(f"afsplit: error: {rec['error']}", file=self.err, flush=True)
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        elif "text" in rec:
            self.texts[rec["index"]] = rec["text"]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> int:
        """Rewrite --output in index order (or print the texts); exit status: 0, or 2 if any request failed."""
        self.close()
        if self.output and self._regular:
            records, _ = read_output(self.output, len(self.inputs), self.output)
            _write_records(self.output, records)
        for i in sorted(self.texts):
            print(self.texts[i])
        return 2 if self.failed else 0


def _write_records(path: str, records: dict[int, dict]) -> None:
    """Replace `path` atomically with `records` in index order."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(records):
            f.write(json.dumps(records[i]) + "\n")
    os.replace(tmp, path)
