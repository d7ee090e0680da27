"""The helpers behind ``cli.py`` (the ``scalpel`` entry point); private, no public API.

The CLI parses, calls one library function per command, prints and writes reports; it does no analysis
and no surgery of its own, and never rewrites library messages: while a command runs it installs its
spelling of arguments (``_core.errors.spelled``), so a library error that names ``overwrite=True`` from
Python names ``--overwrite`` here.

Layout (imports only go downwards; no module imports ``cli``):

- ``app``: ``main`` — parse, install the flag spelling, check outputs and inputs, run one command, print,
  write the report, map errors to exit codes;
- ``parser``: the argument parser, built from the command registry, and ``flag_spelling``;
- ``commands/``: one module per command and the registry (``commands.NAMES``), with each command's
  ``check``/``outputs``/``inputs`` hooks;
- ``context``: ``Context`` (the model, loaded once), ``model_meta``, flags a command line would ignore;
- ``options``: option groups shared by several commands;
- ``inputs``: steering specs, prompt files and vectors given on the command line (``CLIError``);
- ``report``: ``Output`` (what a command returns), tables, JSON, the HTML report;
- ``progress``: progress bars on a terminal.

Adding a command ``foo``: write ``_cli/commands/foo.py`` with ``HELP``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args, ctx) -> Output``, and add ``"foo"`` to ``commands.NAMES``.
"""
