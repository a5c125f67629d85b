"""DVC stage entry points: parse arguments, load params, call medfusion, write files."""

from medfusion.common import telemetry_off

telemetry_off()  # the project's own commands keep telemetry and update checks off
