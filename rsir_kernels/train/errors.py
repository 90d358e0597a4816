"""The error types the training entry point reports as a single line, and their exit statuses."""

EXIT_ERROR = 2       # a bad argument, input file or checkpoint, or divergence
EXIT_WRITE = 74      # a file could not be written (sysexits' EX_IOERR): the previous checkpoint is intact
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after saving its position (EX_TEMPFAIL): run it again


class TrainError(ValueError):
    """A bad argument, input file or checkpoint: the message names it and says what was expected.
    every_rank: raised alike on every rank (bad arguments, divergence), so rank 0 alone prints it."""
    every_rank = False
    exit_status = EXIT_ERROR


class WriteError(TrainError):
    """Writing a run's file failed (disk full, read-only, I/O error): every rank raises it, rank 0
    names the file and the cause; no temporary file is left and the previous checkpoint stands."""
    every_rank = True
    exit_status = EXIT_WRITE


class Preempted(TrainError):
    """A scheduler's SIGTERM or SIGUSR1: every rank finished its step, last.pt holds that exact
    position, and the same command with --resume auto (or --resume OUTPUT/last.pt) continues it."""
    every_rank = True
    exit_status = EXIT_PREEMPTED


def write_failure(path: str, error: BaseException) -> WriteError:
    """One line naming the file and the cause. torch.save reports a full disk as a RuntimeError
    ("[enforce fail at inline_container.cc] ... file write failed") chained to the OSError that
    says why: the OSError's words are used where the chain has one."""
    cause = error
    while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
        cause = cause.__cause__ or cause.__context__
    reason = cause.strerror if cause is not None else (str(error).splitlines() or [type(error).__name__])[0]
    return WriteError(f"cannot write {path}: {reason}")
