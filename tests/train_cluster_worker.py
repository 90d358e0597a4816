"""python -m rsir_kernels.train with what a cluster does to it, at a chosen optimizer step
(tests/test_train_cluster.py runs it, alone or under torchrun):

    RSIR_TEST_EVENT=ACTION:STEP[:RANK] python tests/train_cluster_worker.py <train arguments>

ACTION, on RANK (default 0) after optimizer step STEP (counted over the whole run):
  sigterm-self, sigusr1-self      the signal to this process (a scheduler signalling the job)
  sigterm-parent, sigusr1-parent  the signal to the parent process (torchrun's agent)
  kill-once                       SIGKILL to this process, only in torchrun's first attempt
                                  (TORCHELASTIC_RESTART_COUNT 0, or unset without torchrun)
  fill-disk                       fill the file system of --output (a disk that runs full)
Then the trainer's own entry point runs: its exit status and its one line are the trainer's.
"""
import functools
import os
import signal
import sys

from rsir_kernels.train import main, run


def _fill(folder: str) -> None:
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def hook(action: str, at_step: int, rank: int, output: str):
    def on_step(step, loss, model):
        if step != at_step or int(os.environ.get("RANK", "0")) != rank:
            return
        if action in ("sigterm-self", "sigusr1-self", "sigterm-parent", "sigusr1-parent"):
            sig = signal.SIGTERM if action.startswith("sigterm") else signal.SIGUSR1
            os.kill(os.getppid() if action.endswith("parent") else os.getpid(), sig)
        elif action == "kill-once":
            if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
        elif action == "fill-disk":
            _fill(output)
        else:
            raise ValueError(f"RSIR_TEST_EVENT: unknown action {action!r}")
    return on_step


if __name__ == "__main__":
    argv = sys.argv[1:]
    event = os.environ.get("RSIR_TEST_EVENT")
    if event:
        action, step, *rank = event.split(":")
        output = argv[argv.index("--output") + 1]
        run.train = functools.partial(run.train, on_step=hook(action, int(step), int(rank[0]) if rank else 0, output))
    sys.exit(main(argv))
