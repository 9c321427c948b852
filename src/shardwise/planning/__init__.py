"""From a user's plan to the flat per-module plan every rank agrees on, before anything moves.

=================  ===========================================================================
``expand``         a plan (one style, or a dict of glob keys) -> flat ``{fqn: primitive style}``
``auto``           the ``"auto"`` plan registry (Hugging Face models register themselves)
``agreement``      every rank holds the same flat plan (one all-gather), or every rank raises
``ties``           parameters shared by two modules stay one parameter, or the plan is refused
=================  ===========================================================================
"""
