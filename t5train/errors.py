"""The error type for mistakes a user can fix (bad config, unknown task, bad path).

Entry points report a ``UserError`` as one line and exit with status 2; every
other exception is a bug or an environment failure and exits with status 1.
"""


class UserError(Exception):
  """A problem in the user's input, described so that they can fix it."""


class TrainingError(Exception):
  """Training cannot go on (e.g. the loss became NaN); reported as one line, exit status 1."""
