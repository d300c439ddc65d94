"""Weight import: released VTP checkpoints and torch-layout weight files."""
