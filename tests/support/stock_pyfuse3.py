"""The dmfs command as it runs with stock pyfuse3 (no ``enable_cache_symlinks``).

``python -m tests.support.stock_pyfuse3 mount CONFIG MOUNTPOINT`` removes the
two attributes that contrib/pyfuse3's patch adds before dmfs is imported:
dmfs then neither asks the kernel to cache its fs links nor can learn the
answer, exactly as with an unpatched pyfuse3, without building one.
"""

from __future__ import annotations

import pyfuse3

for attribute in ("enable_cache_symlinks", "cache_symlinks_granted"):
    if hasattr(pyfuse3.Operations, attribute):
        delattr(pyfuse3.Operations, attribute)

from dmfs.cli import main  # noqa: E402  (after the attributes are gone)

raise SystemExit(main())
