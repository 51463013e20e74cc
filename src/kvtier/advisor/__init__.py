"""``kvtier advise``: an offline simulator of kvtier's tiers on a trace (see ``command``)."""
