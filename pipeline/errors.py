"""Error types users see. Each message names the file / line / config key and what to do."""


class ConfigError(ValueError):
    """A config value is wrong or inconsistent; the message names the key and the fix."""


class DataError(ValueError):
    """Input data or prepared shards are unusable; the message names the file and the fix."""


class CheckpointError(DataError):
    """A checkpoint or weights folder is missing, truncated or of another model; the message names
    the file and what to do."""


def rank_local(error: DataError) -> DataError:
    """Mark an error that only the rank raising it sees (a damaged tensor or shard it read): the
    entry point then prints it from that rank, not only from local rank 0."""
    error.rank_local = True
    return error
