"""Handlers for the site-level subcommands: init, passwd, render, dns."""
from __future__ import annotations

import sys

from .errors import MkMailImageError


def cmd_init(args) -> int:
    from .initsite import init_site, read_new_password
    password = read_new_password(True) if args.password_stdin else None
    init_site(args.domain, args.dir, user=args.user, ed25519=args.ed25519, password=password)
    return 0


def cmd_passwd(args) -> int:
    from .initsite import read_new_password, set_password
    from .site import load_site
    load_site(args.site)  # a broken site file is reported before asking for a password
    added = set_password(args.site, args.user, read_new_password(args.stdin))
    print(f"{'added' if added else 'changed password of'} {args.user} in {args.site}")
    return 0


def cmd_render(args) -> int:
    from .render import render_tree, write_tree
    from .site import load_site
    site = load_site(args.site)
    tree = render_tree(site, args.os)
    if args.check:
        from .checkers import check_tree
        check_tree(tree, args.os)   # raises with the checker's own output; nothing written
    write_tree(tree, args.out)
    print(f"rendered {len(tree)} entries for {args.os} into {args.out}")
    return 0


def cmd_dns(args) -> int:
    from .dnsrecords import check, zone_snippet
    from .site import load_site
    site = load_site(args.site)
    if not args.check:
        sys.stdout.write(zone_snippet(site))
        return 0
    bad = 0
    for record, state, found in check(site, args.nameserver):
        if record.publish_at_provider and state != "ok":
            state += " (set by the provider)"
        print(f"{state:<10} {record.rtype:<5} {record.name}" + (f"  found: {found}" if state != "ok" and found else ""))
        bad += not state.startswith("ok")
    if bad:
        raise MkMailImageError(f"{bad} record(s) missing or different")
    return 0
