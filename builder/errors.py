"""Errors the CLI turns into one clear line and a non-zero exit, never a traceback."""


class MkMailImageError(Exception):
    """Base of every error meant for the user. `exit_code` is what the CLI returns."""

    exit_code = 1


class SiteError(MkMailImageError):
    """A site file is invalid. Carries the place so the message can name file, line, column, field."""

    exit_code = 2

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 column: int | None = None, field: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<site>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class SiteErrors(SiteError):
    """Several validation problems found at once; shown one per line."""

    def __init__(self, errors: list[SiteError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, first.file, first.line, first.column, first.field)

    def __str__(self) -> str:
        return "\n".join(SiteError.__str__(e) for e in self.errors)


class BuildError(MkMailImageError):
    """A build step failed; the message says which step and why."""

    exit_code = 3


class ToolMissing(MkMailImageError):
    """A host tool the step needs is not installed."""

    exit_code = 4

    def __init__(self, tool: str, package: str):
        super().__init__(f"'{tool}' not found: install the Debian package '{package}'")
