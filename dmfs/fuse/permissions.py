"""Who may change the tree: root and the admin group (DESIGN.md §3).

dmfs checks this itself rather than with the kernel's ``default_permissions``,
so that members of the admin group can act on read-only nodes and every
refusal is logged.  FUSE requests carry only the caller's uid and gid; the
supplementary groups come from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import pyfuse3


def groups_of(pid: int) -> set[int]:
    """Supplementary groups of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def is_admin(ctx: pyfuse3.RequestContext, admin_gid: int | None) -> bool:
    """Root, or a member of the admin group."""
    if ctx.uid == 0:
        return True
    return admin_gid is not None and (ctx.gid == admin_gid or admin_gid in groups_of(ctx.pid))


def why_not_admin(ctx: pyfuse3.RequestContext, admin_gid: int | None) -> str:
    group = "the admin group" if admin_gid is not None else "root (no admin_group set)"
    return f"uid {ctx.uid} (pid {ctx.pid}) is not root or in {group}"
