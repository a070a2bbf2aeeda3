"""Operator and developer tools that the daemon never imports: benches, `rampd report`, the demo
and its local broker, the PJM score.

`rampd run` loads none of this; the CLI registers the tools' arguments from
`controller.tools.commands` (argparse only) and imports a tool when it runs. Plotting and the
embedded broker come with the `tools` extra (`pip install 'rampd[tools]'`).
"""

TOOL_MODULES = frozenset({"matplotlib", "amqtt"})
"""Third-party modules only the tools use; the CLI names the extra when one is missing."""
