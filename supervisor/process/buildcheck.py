"""`llm-supervisord --check-build`: whether this machine can run this llama.cpp build's kernels.

CPU flags are not proof. A virtual machine may advertise an instruction family its hypervisor does not
enable (seen here: AMX advertised, `tilezero` faults with SIGILL), and a build made on one machine (the
container image) runs on others. So the check runs the real thing: a generated model, quantized the ways
real GGUFs ship, loaded and generating through llama.cpp — each kind in a process of its own, so an
illegal instruction ends one probe, not the check. deploy/setup.sh runs it after every build, the
systemd unit before every start, the Kubernetes DaemonSet in an init container on every node.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from supervisor.settings.demo_model import QUANTIZABLE, quantize, write_model
from supervisor.process.states import describe_exit

# f32 is what the generated test models are; the rest are what real GGUFs ship as. Q4_0 also takes
# llama.cpp's repacking path for CPU weights, Q4_K_M the K-quant kernels.
KINDS = ("F32", "Q8_0", "Q4_0", "Q4_K_M")
PROBE_TIMEOUT_S = 120.0
# A prompt longer than one token exercises the batched (matrix × matrix) kernels, generation the
# matrix × vector ones: instruction families differ between the two (AMX serves only the first).
PROMPT = "the model memory worker token stream " * 3


def probe(kind: str, model: Path) -> None:
    """In the probe's own process: quantize `model` to `kind`, load it, evaluate a prompt, generate."""
    import llama_cpp

    path = model if kind == "F32" else quantize(model, model.with_name(f"{kind}.gguf"), kind)
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=128, verbose=False)
    out = llm(PROMPT, max_tokens=8, temperature=0.0)
    if not out["choices"][0]["text"]:
        raise SystemExit(f"{kind}: generated nothing")


def failure(kind: str, model: Path) -> str:
    """Empty when `kind` loads and generates here; otherwise what went wrong, in words."""
    try:
        done = subprocess.run([sys.executable, "-m", "supervisor.process.buildcheck", "--probe", kind, str(model)],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    if done.returncode == 0:
        return ""
    said = [line for line in done.stderr.splitlines() if line.strip()]
    last_words = f": {said[-1]}" if said and done.returncode > 0 else ""  # a signal leaves only log lines
    return describe_exit(done.returncode) + last_words


def check(kinds: tuple[str, ...] = KINDS) -> dict[str, str]:
    """Each kind's failure ("" when it runs)."""
    with tempfile.TemporaryDirectory(prefix="llm-supervisor-check-") as directory:
        model = write_model(Path(directory) / "F32.gguf", QUANTIZABLE, name="check")
        return {kind: failure(kind, model) for kind in kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-supervisord --check-build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe[0], Path(args.probe[1]))
        return 0
    results = check()
    for kind, why in results.items():
        print(f"{kind:7} {'ok' if not why else 'FAILED: ' + why}", flush=True)
    failed = [kind for kind, why in results.items() if why]
    if not failed:
        print("check-build: this machine runs this llama.cpp build")
        return 0
    illegal = any("SIGILL" in results[kind] for kind in failed)
    print(f"check-build: {', '.join(failed)} cannot run here"
          + (": the llama.cpp build uses an instruction this CPU cannot execute. Rebuild it for a CPU level "
             "this machine runs (`LLAMA_CPU=x86-64-v2 bash deploy/setup.sh`; README, 'CPU support')"
             if illegal else ""), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
