from __future__ import annotations

from maxact_card.cli import main

if __name__ == "__main__":
    main()
