"""The release gate: results + policy (+ baseline, + card status) -> verdict; and the diff of two results.

- `policy.py`: the policy file (TOML) and the built-in default, with the reasons for its limits;
- `rules.py`: each rule's check and `evaluate`, which gives the verdict;
- `verdict.py`: what a check returns (rule outcomes, the verdict, the card status it was given);
- `baseline.py`: results to compare against, from a file or a Hub repository;
- `diff.py`: what changed between two results;
- `summary.py`: the verdict and results as Markdown (the Action's job summary).

Pure functions over the results dictionaries (`schemas/maxact-results.schema.json`). Nothing here
prints or exits: callers render the returned values and map `MaxactError` to exit codes.
"""
