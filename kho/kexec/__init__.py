"""A modelled arm64 kexec.

Load: :mod:`.kimage` (segments, source pages), :mod:`.entries` (the entry list),
:mod:`.transpgd` (transitional page tables), :mod:`.purgatory` (segment checks).
Reboot: :mod:`.relocate`.  Time: :mod:`.timing`, :mod:`.profiles`.
"""
