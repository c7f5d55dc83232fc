"""The peers a sweep runs next to lmlab, on the same weights, timed the same way.

- ``hf``: transformers ``generate`` on the same checkpoint (a HF folder, or the same GGUF file,
  which transformers dequantizes to float), in the same dtype, on the same threads (same
  process), greedy, ``min_new_tokens = max_new_tokens`` so it never stops early, the same prompt
  ids. Its per-step times come from a streamer: transformers calls ``streamer.put`` once with
  the prompt and then once per generated step (every row's token at once), right after the
  token is chosen — the same moment lmlab yields a step's events. So TTFT, prefill and decode
  tokens/s and the step-latency percentiles mean the same thing for both.
- ``llama.cpp``: llama-cpp-python on the GGUF file itself (its own quantization, e.g. Q4_1),
  ``n_threads`` = the sweep's threads, greedy, timed per token through ``Llama.generate``.
  Batch 1 only: llama-cpp-python has no batched generate. Only for a model that came from a GGUF.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch

from lmlab.bench.runner import Trial, stored_bytes, weight_bytes_per_step
from lmlab.errors import LmlabError

INSTALL = {
    "hf": "transformers is not installed; pip install transformers (or pip install 'lmlab[test]').",
    "llama.cpp": (
        "llama-cpp-python is not installed; pip install 'lmlab[llamacpp]' (it compiles llama.cpp, a few minutes)."
    ),
}
MODULE = {"hf": "transformers", "llama.cpp": "llama_cpp"}


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def peer_check(peer: str, lm=None) -> None:
    """One sentence if ``peer`` cannot run: not installed, or (with ``lm``) not on these weights."""
    if not _importable(MODULE[peer]):
        raise LmlabError(INSTALL[peer])
    if lm is None:
        return
    kind = lm.resolved.kind if lm.resolved is not None else None
    if peer == "llama.cpp" and kind != "gguf":
        raise LmlabError(
            f"the llama.cpp peer runs GGUF files only and {lm.name} is not one; "
            "drop --peer llama.cpp or bench a GGUF model (e.g. smollm2-135m)."
        )
    if peer == "hf" and kind not in ("hf", "gguf"):
        raise LmlabError(f"the hf peer needs a HF folder or a GGUF file and {lm.name} is neither; drop --peer hf.")
    if peer == "hf" and kind == "gguf" and not _importable("accelerate"):
        raise LmlabError("the hf peer needs accelerate to load a GGUF file into transformers; pip install accelerate.")


def make_peer(peer: str, *, resolved, dtype, device, threads: int, cfg, n_ctx: int = 0):
    peer_check(peer)
    if peer == "hf":
        return HFRunner(resolved, dtype, device)
    return LlamaCppRunner(resolved, threads, cfg, n_ctx, device)


# ----------------------------------------------------------------------------- transformers


class HFRunner:
    """transformers ``generate`` on the same weights, timed per step by a streamer."""

    engine = "hf"

    def __init__(self, resolved, dtype: str, device):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if resolved is None or resolved.kind not in ("hf", "gguf"):
            raise LmlabError("the hf peer needs a HF folder or a GGUF file; drop --peer hf for this model.")
        torch_dtype = getattr(torch, dtype)
        path = resolved.path
        if resolved.kind == "gguf" and not _importable("accelerate"):
            raise LmlabError(
                "the hf peer needs accelerate to load a GGUF file into transformers; pip install accelerate."
            )
        try:
            # transformers draws its own progress bars while reading a GGUF: keep them off our stderr
            with contextlib.redirect_stderr(io.StringIO()):
                model = self._load(transformers, resolved, torch_dtype)
        except (ValueError, OSError, KeyError) as e:  # an architecture or GGUF type transformers cannot read
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmlabError(
                f"transformers could not load {path.name} for the hf peer ({msg}); drop --peer hf for this model."
            ) from None
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.weight_bytes = weight_bytes_per_step(self.model)
        self.stored_bytes = stored_bytes(self.model)
        gc = self.model.generation_config
        # sampling fields a checkpoint may set (temperature, top_p...) are moot for greedy: unset them
        for k in ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty"):
            if hasattr(gc, k):
                setattr(gc, k, None)
        eos = gc.eos_token_id
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if isinstance(eos, list) else (eos or 0))

    @staticmethod
    def _load(transformers, resolved, torch_dtype):
        path = resolved.path
        if resolved.kind == "gguf":
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch_dtype
            )
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)

    def trial(self, ids: list[list[int]], new_tokens: int):
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.t0 = 0.0
                self.prompt_seen = False
                self.stamps = []

            def put(self, value):
                if not self.prompt_seen:  # the first put is the prompt itself
                    self.prompt_seen = True
                    return
                self.stamps.append(time.perf_counter() - self.t0)

            def end(self):
                pass

        # every bench prompt of a point has the same length: no padding, an all-ones mask
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        mask = torch.ones_like(x)
        s = Stamps()
        with torch.inference_mode():
            s.t0 = time.perf_counter()
            self.model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                streamer=s,
                pad_token_id=self.pad,
            )
        if len(s.stamps) != new_tokens:
            raise RuntimeError(f"transformers generated {len(s.stamps)} steps, expected {new_tokens}")
        return Trial(len(ids), len(ids[0]), s.stamps)

    def close(self) -> None:
        self.model = None


# ----------------------------------------------------------------------------- llama.cpp


def gguf_facts(path) -> dict:
    """Bytes of the GGUF's tensors a decode step reads, and its quantization name."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    total, types = 0, Counter()
    for t in reader.tensors:
        # an untied input embedding is only gathered; a tied one is the output head
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
        if len(t.shape) >= 2:
            types[t.tensor_type.name] += int(t.n_bytes)
    quant = types.most_common(1)[0][0] if types else "gguf"
    # the file's own name for its mix (Q4_K_M: mostly Q4_K, some tensors kept at Q5/Q6/Q8), where it says
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            quant = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
        except (ValueError, IndexError):
            pass
    return {"weight_bytes": total, "quant": quant}


class LlamaCppRunner:
    """llama-cpp-python on the GGUF file, batch 1, greedy, timed per generated token.

    llama.cpp runs in a child process: a crash in its native code (some builds' AMX kernels
    segfault on some CPUs) becomes one sentence instead of killing the sweep, its OpenMP runtime
    never meets torch's, and its peak memory is its own. The child times each token itself,
    so the pipe adds nothing to the numbers.
    """

    engine = "llama.cpp"

    def __init__(self, resolved, threads: int, cfg, n_ctx: int, device):
        import multiprocessing

        if resolved is None or resolved.kind != "gguf":
            raise LmlabError("the llama.cpp peer runs GGUF files only; drop --peer llama.cpp for this model.")
        facts = gguf_facts(resolved.path)
        self.path = resolved.path
        self.weight_bytes = facts["weight_bytes"]
        self.stored_bytes = facts["weight_bytes"]
        self.dtype = facts["quant"]  # llama.cpp runs the file's own quantization
        self.device = torch.device(device)
        n_gpu_layers = 0 if self.device.type == "cpu" else -1
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_llama_worker, args=(child, str(resolved.path), threads, max(n_ctx, 64), n_gpu_layers), daemon=True
        )
        self.proc.start()
        child.close()
        self.pid = self.proc.pid  # PeakMemory reads this process's peak RSS
        self._ask(None)

    def _ask(self, request):
        """Send a request (None: wait for the child to be ready) and return its answer."""
        if request is not None:
            self.conn.send(request)
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                self._crashed()
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            self._crashed()
        if kind == "error":
            raise LmlabError(payload)
        return payload

    def _crashed(self):
        import signal

        code = self.proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise LmlabError(
            f"llama.cpp crashed ({how}) running {self.path.name}; builds with AMX kernels do this on some CPUs, so "
            "reinstall it without them: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON' "
            "pip install --force-reinstall --no-cache-dir llama-cpp-python."
        )

    def trial(self, ids: list[list[int]], new_tokens: int):
        if len(ids) != 1:
            raise LmlabError("the llama.cpp peer runs batch 1 only; use --batch 1 for it.")
        stamps = self._ask(("trial", [int(t) for t in ids[0]], int(new_tokens)))
        return Trial(1, len(ids[0]), stamps)

    def close(self) -> None:
        if getattr(self, "proc", None) is None:
            return
        try:
            if self.proc.is_alive():
                self.conn.send(("close",))
            self.proc.join(10)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()
        self.proc = None


def _llama_worker(conn, path: str, threads: int, n_ctx: int, n_gpu_layers: int) -> None:
    """The child process of LlamaCppRunner: load the GGUF, then answer ("trial", ids, n) requests
    with the seconds from the call to each generated token."""
    try:
        from llama_cpp import Llama

        llm = Llama(
            model_path=path,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any load failure is reported as one sentence
        conn.send(("error", f"llama.cpp could not load {path} ({e}); drop --peer llama.cpp for this model."))
        return
    conn.send(("ok", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] != "trial":
            return
        _, ids, n = msg
        try:
            llm.reset()  # forget the previous prompt: llama-cpp-python would reuse its prefix
            stamps = []
            t0 = time.perf_counter()
            # greedy; generate() never stops on EOS by itself (create_completion does), so it runs to n
            for _ in llm.generate(
                ids, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0, repeat_penalty=1.0, reset=False
            ):
                stamps.append(time.perf_counter() - t0)
                if len(stamps) == n:
                    break
            conn.send(("ok", stamps))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"llama.cpp failed while generating ({e})."))
