"""Tools that look at a plan from outside: a dry run before launch, a check against one device.

=================  ===========================================================================
``explain``        :func:`shardwise.explain`: collectives, bytes and memory per rank, on meta
``explain_report`` the report it returns (text tables and ``to_dict()``)
``dryrun``         the fake process group, collective log and saved-activation counter
``verify``         :func:`shardwise.verify`: a plan next to one device, first divergence named
``verify_record``  what verify records per module and phase
``verify_report``  how verify judges the records and words a divergence
=================  ===========================================================================
"""
