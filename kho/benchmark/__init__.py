"""Benchmarks of kho: encodings of the preserved-memory map and the kexec reboot, at 1 GiB to 1 TiB.

Modules, one job each:

* :mod:`.environment` — the machine and software versions a result was measured on;
* :mod:`.encodings`   — one preserved set (pattern, RAM, share) through every encoding:
  bytes, encode / decode seconds, the next kernel's free-list rebuild on each boot path;
* :mod:`.design`      — the sizes of the design discussion (DESIGN.md section 5), computed
  by running the encodings;
* :mod:`.reboot`      — relocation mode x image size x RAM: reboot time and memory cost;
* :mod:`.scale`       — the 1 TiB run: each encoding in its own process, peak RSS measured;
* :mod:`.report`      — JSON documents, markdown tables and the results index;
* :mod:`.plots`       — PNG plots (matplotlib);
* :mod:`.progress`    — a progress bar on stderr for long runs.
"""
