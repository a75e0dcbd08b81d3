"""How much busy cores slow the quickstart's work down, with PyTorch's default threads and with the quickstart's.

    python experiments/benchmarks/busy_cores.py --model models/embedded/init --rounds 3

The work is what the quickstart spends its time on: AdamW steps of the tiny Llama on batches of 32 x 48 tokens,
then greedy generation of 48 tokens for 16 prompts. Each trial runs in a fresh process with a fixed number of
threads. Two settings are compared:

- ``all cores``: as many threads as the machine has cores (PyTorch's default);
- ``quickstart``: the threads :func:`baldro_lightning.embedded.quickstart.threads_for_free_cores` picks from the
  cores and the load it sees when the trial starts.

Each runs with no burner and with ``--burners`` CPU-burning processes (one per core by default), in rounds whose
order rotates, so drift in the machine's own load hits every cell alike. The table gives the median wall time of
each cell and its ratio to the quickstart setting without burners (the idle reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORK = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
threads, model_dir, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir)
vocab = model.config.vocab_size
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.randint(4, vocab, (32, 48))
started = time.perf_counter()
for _ in range(steps):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
with torch.no_grad():
    prompts = torch.randint(4, vocab, (16, 24))
    model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=48, do_sample=False,
                   min_new_tokens=48, pad_token_id=model.config.pad_token_id)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

BURN = "while True: pass"


def quickstart_threads() -> int:
    """The threads the quickstart would pick now (imported here so the script measures the shipped rule)."""
    from baldro_lightning.embedded.quickstart import threads_for_free_cores

    return threads_for_free_cores(os.cpu_count() or 1, os.getloadavg()[0])


def trial(threads: int, model: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", WORK, str(threads), model, str(steps)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/embedded/init", help="a tiny Llama directory (save_pretrained)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell")
    parser.add_argument("--steps", type=int, default=30, help="AdamW steps per trial")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 1, help="CPU-burning processes when busy")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    cells = [(setting, burners) for burners in (0, args.burners) for setting in ("all cores", "quickstart")]
    times: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    chosen: dict[tuple[str, int], list[int]] = {cell: [] for cell in cells}
    print(f"{cores} cores; load at start {os.getloadavg()}")
    for round_ in range(args.rounds):
        for setting, burners in cells[round_ % len(cells) :] + cells[: round_ % len(cells)]:
            procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(burners)]
            try:
                time.sleep(2.0 if burners else 0.0)  # let the load average see the burners
                threads = cores if setting == "all cores" else quickstart_threads()
                seconds = trial(threads, args.model, args.steps)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
            times[(setting, burners)].append(seconds)
            chosen[(setting, burners)].append(threads)
            print(f"round {round_}: {setting:10s} burners={burners} threads={threads} {seconds:6.1f} s", flush=True)
    reference = statistics.median(times[("quickstart", 0)])
    print(f"\nload at end {os.getloadavg()}\n")
    print("| setting | burners | threads | median s | rounds (s) | / quickstart without burners |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for cell in cells:
        median = statistics.median(times[cell])
        rounds = ", ".join(f"{t:.1f}" for t in times[cell])
        threads = ",".join(str(t) for t in sorted(set(chosen[cell])))
        print(f"| {cell[0]} | {cell[1]} | {threads} | {median:.1f} | {rounds} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
