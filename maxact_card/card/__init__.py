"""The "Maximum activations" model-card section.

- `section.py`: render the section (Markdown from the results, through templates/section.md.j2) and the
  front-matter summary;
- `front_matter.py`: read a card into its YAML front matter and body, and find the section's markers;
- `splice.py`: put a fresh section and summary into a card, keeping every other byte;
- `validate.py`: check that a card's section, summary and links agree with its results and weights;
- `paths.py`: where the card, the results and the chart live in a repository;
- `chart.py`: the per-layer SVG profile.

The package never prints or exits: it returns values or raises `UsageError` (exit 2) subclasses.
"""
