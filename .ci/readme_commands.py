"""Print the README's two set-up commands, one per line: the ```bash blocks of its "## Two commands"
section. Exits 1 unless there are exactly two, each one line, so that CI runs what README says."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(encoding="utf-8")
section = re.search(r"^## Two commands\n(.*?)(?=^## )", text, re.S | re.M)
if section is None:
    sys.exit("README.md has no '## Two commands' section")
blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
commands = [b.strip() for b in blocks]
if len(commands) != 2 or any("\n" in c or not c for c in commands):
    sys.exit(f"README.md's '## Two commands' must hold exactly two one-line ```bash blocks, found {len(commands)}")
print("\n".join(commands))
