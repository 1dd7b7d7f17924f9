"""`qwenrun bench`: measuring this machine. One bench from a model reference to a report
(`measure`): which placements to try around the plan (`candidates`), running them repeated and
alternated (`runner`), and keeping the results, the speed model fitted to them and the
measured placements the planner weighs (`store`)."""
