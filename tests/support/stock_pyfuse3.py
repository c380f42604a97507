"""The dmfs command as it runs with stock pyfuse3 (no ``enable_cache_symlinks``,
no ``FileInfo.cache_readdir``).

``python -m tests.support.stock_pyfuse3 mount CONFIG MOUNTPOINT`` removes the
two attributes that contrib/pyfuse3's first patch adds before dmfs is
imported, and tells dmfs that the second one's is missing (an extension
type's attribute cannot be deleted): dmfs then neither asks the kernel to
cache its fs links and listings nor can learn the answer, exactly as with an
unpatched pyfuse3, without building one.
"""

from __future__ import annotations

import pyfuse3

for attribute in ("enable_cache_symlinks", "cache_symlinks_granted"):
    if hasattr(pyfuse3.Operations, attribute):
        delattr(pyfuse3.Operations, attribute)

from dmfs.fuse import listings  # noqa: E402  (after the attributes are gone)

listings.PYFUSE3_CAN_CACHE = False

from dmfs.cli import main  # noqa: E402

raise SystemExit(main())
