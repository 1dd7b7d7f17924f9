"""`qwenrun bench`: measuring this machine. Which placements to try around the plan
(`candidates`), running them repeated and alternated (`runner`), and keeping the results,
the speed model fitted to them and the measured-best placements (`store`)."""
