"""blockbench -- the code behind bench/run: fio through NBD against blockd and
reference servers, and scenario presets with their own tables.

Python 3 standard library only.  See bench/README.md.

Modules:
- common:      constants, BenchError, logging, formatting, size parsing
- procs:       process supervision (spawn in own process group with
               PR_SET_PDEATHSIG, stop by PID, bounded helpers), temp dir with
               owner file, page-cache eviction, CPU time, file comparison
- machine:     tools (apt-get install), blockd/blockctl build and lookup,
               machine description for headers
- ctx:         the run context (disks, ports, blockctl, readiness) and the
               blockd config writer
- fio:         jobs, fio command, JSON parsing, medians, one measured run with
               CPU accounting (CPU% and CPU us per request, per role)
- servers:     Handle / ServerSpec and the single-process variants
- pair:        Nodes (blockd pair or standalone node driven through blockctl)
               and the pair variants' start + hooks
- matrix:      the main job x server table
- replication: --preset replication (pair variants, targets, footer)
- tls:         --preset tls (TLS variants, TLS cost footer)
- scenario:    the frame of scenario presets (parts, failures, report)
- resync:      --preset resync (resync, verify, write-intent log)
- netns:       network namespaces, veth, tc tbf and the delay proxy for wan
- wan:         --preset wan (WAN throughput, compression, catch-up)
- cli:         options and dispatch
"""
