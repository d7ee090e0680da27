"""The helpers behind ``cli.py`` (the ``scalpel`` entry point); private, no public API.

Layout (imports only go downwards; no module imports ``cli``):

- ``app``: ``main`` — parse, check outputs, run one command, print, write the report, map errors to exit codes;
- ``parser``: the argument parser, built from the command registry;
- ``commands/``: one module per command and the registry (``commands.NAMES``);
- ``context``: ``Context`` (the model, loaded once), ``model_meta``, ``check_outputs``;
- ``options``: option groups shared by several commands;
- ``inputs``: parsing and checking of flag values and prompt files (``CLIError``);
- ``report``: ``Output`` (what a command returns), tables, JSON, the HTML report;
- ``ablate``: the measurements behind ``ablate`` and ``sweep``.

Adding a command ``foo``: write ``_cli/commands/foo.py`` with ``HELP``, ``EXAMPLE``,
``add_arguments(parser)`` and ``run(args, ctx) -> Output``, and add ``"foo"`` to ``commands.NAMES``.
"""
