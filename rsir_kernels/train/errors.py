"""The one error type the training entry point reports as a single line (and exit status 2)."""


class TrainError(ValueError):
    """A bad argument, input file or checkpoint: the message names it and says what was expected.
    every_rank: raised alike on every rank (bad arguments, divergence), so rank 0 alone prints it."""
    every_rank = False
