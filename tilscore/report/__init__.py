"""`tilscore report`: the cohort read from an output folder (`cohort`), its data types
(`types`), plots (`plots`) and the self-contained HTML page (`html`)."""
