"""The ``dmfs`` command: one module per command family, put together in :mod:`.main`.

- :mod:`.common`: what every command shares: exit statuses, UsageError and
  OperationFailed, logging, :func:`~.common.emit`, argument types,
  :func:`~.common.add_command` and the ``--json`` / ``--driver`` options.  It
  imports no command module.
- :mod:`.preflight`: the checks of the machine a command runs before it touches
  anything (root, device-mapper, FUSE, a tool, the pool, the mountpoint).
- the command families: :mod:`.mount` (``mount``, also the program behind
  ``mount -t fuse.dmfs``), :mod:`.inspect` (``status``, ``tree``, ``check``),
  :mod:`.pool` (``pool create``, ``pool destroy``), :mod:`.config` (``config``),
  :mod:`.demo` (``demo``).
- :mod:`.main`: :func:`build_parser` (every command, in the order of
  ``COMMANDS``), :func:`~.main.mount_helper_argv` and :func:`main`.

Adding a command: write a module whose ``add_parser(commands)`` adds its
sub-parser with :func:`~.common.add_command` (the logging options, the examples
and the exit statuses come with it) and ``set_defaults(run=<function>)``, and
list the module with its command names in ``COMMANDS`` in :mod:`.main`.  A
command imports only its own family's module (``dmfs --help`` imports them
all), and every module imports at its top only what its parsers need: what a
command runs (the engine's heavier parts, trio, pyfuse3, subprocess, ...) is
imported by the function that runs it, since every import is paid by every
command's start (bench/diff_ops.py times ``dmfs diff`` as a whole command;
tests/unit/test_cli_imports.py guards it).  ``run(args) -> int`` checks
the machine with :mod:`.preflight` before it touches anything, and returns
the exit status or raises: ConfigError / UsageError -> 2, EnvironmentProblem ->
3, OperationFailed / PoolAdminError / DmError / OSError -> 1; :func:`main` logs
the one-line message.  A command translates the engine errors it expects into
these (a missing pool is an EnvironmentProblem).  Print data to stdout with
:func:`~.common.emit` (it handles ``--json``); everything else goes through
``logging``.

Exit status, the same for every command (``EXIT_STATUS_HELP``): 0 done; 1 the
operation failed; 2 usage or configuration error, nothing touched; 3 the
machine is not ready (kernel support, a tool, privileges, the pool, the
mountpoint), nothing touched; 130 interrupted.

The commands use the engine through :mod:`dmfs.pool` only (the names its
``__all__`` lists); ``contrib/check-imports``, in the lint tier, holds them to it.
"""

from dmfs.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
