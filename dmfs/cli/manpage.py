"""The manual page dmfs(8), generated from the command's argparse definitions.

``python -m dmfs.cli.manpage [FILE]`` writes it (stdout without FILE); the
production install (contrib/install-system) puts it in
/usr/local/share/man/man8.  Every command and sub-command of
:func:`dmfs.cli.build_parser`, with its synopsis, description, options, notes
and examples, comes from the parser, so ``--help`` and the page cannot
disagree; so do the exit statuses and the configuration keys with their
defaults.  What a parser cannot say (what the tree looks like, mount helpers
and fstab, files, see also) is written here.

A small generator instead of argparse-manpage: that one renders neither
nested sub-commands (``pool create``) nor dmfs's epilogs (notes, examples,
exit statuses) as sections, and it would be one more dependency of the
install.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from dmfs import __version__
from dmfs.cli.common import EXIT_STATUS_HELP
from dmfs.cli.main import build_parser

SECTION = 8
#: options every sub-command takes; described once, under OPTIONS
COMMON_DESTS = frozenset({"help", "log_level", "log_format"})

NAME_LINE = "dmfs \\- snapshots of a device\\-mapper thin pool as a directory tree"

DESCRIPTION = """\
dmfs is a FUSE daemon that shows the snapshots of a device-mapper thin pool as a \
directory tree. Users and scripts manage snapshots with ordinary directory operations: \
`mkdir` prepares a snapshot, `mv` commits it, `rmdir` removes it. Each snapshot is a \
thin device with its own filesystem (ext4, or xfs with fs_type = "xfs"), whose files \
appear under the node's `fs` directory. The semantics follow containerd's devmapper \
snapshotter (Prepare, View, Commit, Remove, Stat, Walk, Usage, Update).

In the mounted tree M:
.nf
  M/NAME/          a snapshot node; M/NAME/fs holds its files
  M/NAME/CHILD/    a snapshot whose parent is NAME
  M/.dmfs/pool     pool status; M/.dmfs/snapshots.json every snapshot
  M/.dmfs/by-name/NAME   a link to the node, wherever it is nested
.fi

A parentless `mkdir M/NAME` makes an empty, writable (active) snapshot; `mkdir` under a \
committed node makes a child with its content; `mkdir -m 0555` makes a read-only view. \
`mv` of an active node commits it (read-only from then on); `mv` of a committed node \
renames it. `rmdir` removes a snapshot without children. Labels are the extended \
attributes user.label.KEY; user.dmfs.* attributes show kind, parent, state and usage. \
Changes need root or membership in the configured admin_group; everyone may browse. \
Refused operations fail with an errno (EPERM, EEXIST, EBUSY, ENOTEMPTY, EROFS, ENOSPC, \
EACCES, EINVAL) and dmfs logs one line saying why.

File data never passes through dmfs: `fs` is a symbolic link to the snapshot's own mount \
under the runtime directory, so work done inside it runs at the filesystem's native speed."""

MOUNT_HELPER = """\
mount(8) mounts type fuse.dmfs by running /sbin/mount.fuse.dmfs, which the production \
install links to dmfs. Without that link, mount.fuse3(8) (as /sbin/mount.fuse) runs \
`dmfs CONFIG MOUNTPOINT -o OPTIONS` from the PATH; the fstab spelling dmfs#CONFIG with \
type fuse does the same. dmfs takes both calls for `dmfs mount CONFIG MOUNTPOINT -o \
OPTIONS` and returns once the tree is mounted; `mount -f` checks the configuration and \
mounts nothing. The mount options are those of `dmfs mount`; the usual generic ones \
(rw, nodev, nosuid, nofail, _netdev, x-systemd.*) are accepted.

Two /etc/fstab lines that mount the same tree, one spelling each:
.nf
  /etc/dmfs/pool0.toml  /srv/snapshots  fuse.dmfs  nofail,nodev,nosuid  0 0
  dmfs#/etc/dmfs/pool0.toml  /srv/snapshots  fuse  nofail,nodev,nosuid  0 0
.fi

For a pool made at boot or restarts on failure, prefer the systemd unit: `systemctl enable \
--now dmfs@pool0` serves /etc/dmfs/pool0.toml (Type=notify). Use one way per pool."""

CONFIGURATION = """\
One TOML file per pool, by convention /etc/dmfs/NAME.toml, holding exactly one table: \
[dmfs], or containerd's [plugins.devmapper] or \
[plugins."io.containerd.snapshotter.v1.devmapper"], so a containerd devmapper table can be \
copied as it is. pool_name and base_image_size are required; unknown keys are errors, and \
`dmfs config FILE` checks a file. Sizes are 1024-based as in containerd ("10GB" = \
"10GiB"); durations are seconds or e.g. "30s", "5m", "1h30m". \
/etc/dmfs/dmfs.toml.example describes every key. The keys and their defaults:"""

FILES = [
    ("/etc/dmfs/NAME.toml", "the configuration of pool NAME (dmfs@NAME.service reads it)"),
    ("/etc/dmfs/dmfs.toml.example", "every configuration key, described"),
    ("/var/lib/dmfs/NAME/", "the metadata journal and checkpoint (root_path)"),
    ("/run/dmfs/NAME/", "the snapshot mounts the fs links point to, dmfs.pid, and dmfs.log "
                        "when there is no syslog (runtime_path)"),
    ("/usr/local/lib/systemd/system/dmfs@.service", "one daemon per configuration"),
    ("/sbin/mount.fuse.dmfs", "the mount helper, a link to dmfs"),
    ("/opt/dmfs/", "the production install's virtual environment"),
    ("/usr/local/share/doc/dmfs/", "README, fstab example, production pool notes"),
]

SEE_ALSO = ["mount(8)", "umount(8)", "mount.fuse3(8)", "fstab(5)", "systemd.mount(5)",
            "dmsetup(8)", "thin_ls(8)", "thin_check(8)", "lvmthin(7)", "losetup(8)",
            "mkfs.ext4(8)", "mkfs.xfs(8)", "getfattr(1)", "setfattr(1)"]


# ---- roff ----------------------------------------------------------------------------


def escape(text: str) -> str:
    """Plain text as roff: backslashes, dashes (as \\-, so options copy and paste),
    a leading . or ', and characters beyond ASCII."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def inline(text: str) -> str:
    """Escaped prose, with `code` in bold."""
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", escape(text))


def prose(text: str) -> list[str]:
    """Paragraphs separated by blank lines; within one, lines are joined (roff
    fills them) unless the paragraph is laid out: a heading line followed by
    indented lines, or lines between ``.nf`` and ``.fi``, kept as they are."""
    lines: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
        raw = paragraph.splitlines()
        if ".nf" in raw:
            start, end = raw.index(".nf"), raw.index(".fi")
            lines += prose("\n".join(raw[:start])) if start else []
            lines += [".PP", ".RS 2", ".nf", *(inline(line.strip()) for line in raw[start + 1:end]),
                      ".fi", ".RE"]
            lines += prose("\n".join(raw[end + 1:])) if raw[end + 1:] else []
        elif any(line.startswith((" ", "\t")) for line in raw[1:]):
            heading, body = raw[0], raw[1:]
            lines += [".PP", inline(heading), ".RS 2", ".nf",
                      *(inline(line.strip()) for line in body), ".fi", ".RE"]
        else:
            lines += [".PP", inline(" ".join(line.strip() for line in raw))]
    return lines


# ---- the parser ----------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every sub-command, depth first in the parser's order, e.g. ("pool", "create")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


def expanded_help(action: argparse.Action, prog: str) -> str:
    """An option's help with argparse's %(default)s-style fields filled in."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    params = {key: getattr(value, "__name__", value) for key, value in params.items()}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % dict(params, prog=prog)


def metavar_of(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def usage_item(action: argparse.Action) -> str:
    """One action as the synopsis shows it (roff)."""
    if not action.option_strings:
        text = f"\\fI{escape(metavar_of(action))}\\fR"
        return f"[{text}]" if action.nargs == "?" else text
    text = f"\\fB{escape(action.option_strings[-1])}\\fR"
    if action.nargs != 0:
        text += f" \\fI{escape(metavar_of(action))}\\fR"
    return text


def own_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions
            if action.dest not in COMMON_DESTS
            and not isinstance(action, argparse._SubParsersAction)]


def synopsis(path: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    """``dmfs pool create --loopback DIR ... [--json]``, mutually exclusive options
    as ``[--json | --dot]``, as argparse's usage line has them."""
    groups = {id(action): group for group in parser._mutually_exclusive_groups
              for action in group._group_actions}
    items: list[str] = []
    done: set[int] = set()
    for action in own_actions(parser):
        group = groups.get(id(action))
        if group is not None:
            if id(group) in done:
                continue
            done.add(id(group))
            inner = " | ".join(usage_item(a) for a in group._group_actions)
            items.append(f"({inner})" if group.required else f"[{inner}]")
        elif action.option_strings and not action.required:
            items.append(f"[{usage_item(action)}]")
        else:
            items.append(usage_item(action))
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        items.append("\\fIACTION\\fR ...")
    return " ".join([f"\\fBdmfs {escape(' '.join(path))}\\fR", *items])


def epilog_parts(epilog: str) -> tuple[list[str], list[str]]:
    """A sub-command's epilog (dmfs.cli.add_command) as notes and example lines; the
    exit statuses are left out (one section has them)."""
    notes, examples = [], []
    for paragraph in re.split(r"\n\s*\n", epilog.strip("\n")):
        first = paragraph.splitlines()[0]
        if first in ("example:", "examples:"):
            examples += [line.strip() for line in paragraph.splitlines()[1:]]
        elif first != "exit status:":
            notes.append(paragraph)
    return notes, examples


def command_section(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    lines = [f".SS {synopsis(path, parser)}"]
    lines += prose(parser.description or "")
    for action in own_actions(parser):
        names = ", ".join(f"\\fB{escape(option)}\\fR" for option in action.option_strings)
        label = (f"{names} \\fI{escape(metavar_of(action))}\\fR"
                 if action.option_strings and action.nargs != 0 else
                 names or f"\\fI{escape(metavar_of(action))}\\fR")
        lines += [".TP", label, inline(expanded_help(action, parser.prog))]
    notes, examples = epilog_parts(parser.epilog or "")
    for note in notes:
        lines += prose(note)
    if examples:
        lines += [".PP", "Example" + ("s:" if len(examples) > 1 else ":"), ".RS 2", ".nf",
                  *(escape(example) for example in examples), ".fi", ".RE"]
    return lines


def exit_statuses(text: str) -> list[tuple[str, str]]:
    """``(status, meaning)`` from dmfs.cli's EXIT_STATUS_HELP."""
    rows: list[list[str]] = []
    for line in text.splitlines()[1:]:
        match = re.match(r"\s+(\d+)\s+(.*)", line)
        if match:
            rows.append([match[1], match[2]])
        elif rows:
            rows[-1][1] += " " + line.strip()
    return [(status, meaning) for status, meaning in rows]


def config_defaults() -> list[tuple[str, str]]:
    """Every configuration key with its default as TOML would spell it."""
    from dmfs.config import CONFIG_KEYS, REQUIRED_KEYS, Config

    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    rows = []
    for key in CONFIG_KEYS:
        value = defaults.get(key, dataclasses.MISSING)
        if key in REQUIRED_KEYS or value is dataclasses.MISSING:
            shown = "(required)"
        elif value is None:
            shown = "(unset)"
        elif isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, str):
            shown = f'"{value}"'
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        rows.append((key, shown))
    return rows


def render(parser: argparse.ArgumentParser, exit_status_help: str, *,
           date: datetime.date | None = None) -> str:
    """The whole page (roff, man macros)."""
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
        date = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date() if epoch
                else datetime.date.today())
    commands = list(subcommands(parser))
    top_options = [a for a in parser._actions
                   if not isinstance(a, argparse._SubParsersAction)]
    lines = [
        f'.TH DMFS {SECTION} "{date.isoformat()}" "dmfs {__version__}" '
        f'"System Administration"',
        ".SH NAME", NAME_LINE,
        ".SH SYNOPSIS",
        "\\fBdmfs\\fR [\\fB\\-\\-log\\-level\\fR \\fILEVEL\\fR] "
        "[\\fB\\-\\-log\\-format\\fR \\fIFORMAT\\fR] \\fICOMMAND\\fR ...",
    ]
    for path, sub in commands:
        lines += [".br", synopsis(path, sub)]
    lines += [".br", "\\fBdmfs\\fR \\fICONFIG\\fR \\fIMOUNTPOINT\\fR "
                     "[\\fB\\-o\\fR \\fIOPTIONS\\fR]",
              ".br", "\\fBmount.fuse.dmfs\\fR \\fICONFIG\\fR \\fIMOUNTPOINT\\fR "
                     "[\\fB\\-o\\fR \\fIOPTIONS\\fR]",
              ".br", "\\fBdmfs \\-\\-version\\fR"]
    lines += [".SH DESCRIPTION", *prose(DESCRIPTION)]
    lines += [".SH OPTIONS", "These options are taken before or after the command name."]
    for action in top_options:
        names = ", ".join(f"\\fB{escape(option)}\\fR" for option in action.option_strings)
        if action.nargs != 0:
            names += f" \\fI{escape(metavar_of(action))}\\fR"
        lines += [".TP", names, inline(expanded_help(action, parser.prog))]
    lines += [".SH COMMANDS"]
    for path, sub in commands:
        lines += command_section(path, sub)
    lines += [".SH MOUNT HELPER AND FSTAB", *prose(MOUNT_HELPER)]
    lines += [".SH CONFIGURATION", *prose(CONFIGURATION), ".PP", ".RS 2", ".nf"]
    width = max(len(key) for key, _ in config_defaults())
    lines += [escape(f"{key:<{width}}  {value}") for key, value in config_defaults()]
    lines += [".fi", ".RE"]
    lines += [".SH EXIT STATUS"]
    for status, meaning in exit_statuses(exit_status_help):
        lines += [".TP", f"\\fB{status}\\fR", inline(meaning)]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{escape(path)}\\fR", inline(what)]
    lines += [".SH SEE ALSO",
              ",\n".join(f"\\fB{escape(page.split('(')[0])}\\fR({page.split('(')[1]}"
                         for page in SEE_ALSO)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    page = render(build_parser(), EXIT_STATUS_HELP)
    if args:
        Path(args[0]).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
