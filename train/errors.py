"""Errors meant for the user: the CLI prints them as one `error:` line and exits with code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint, arguments, environment). The message says what to do."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass
