"""Pure score maths, arrays in and frozen dataclasses out: the region map's areas and
tumour bulk (`aggregate`), the score definitions and their configuration (`score`,
`score_config`), a slide's typed result (`slide_score.SlideScore`), IHC deconvolution
and the cell rule (`ihc`, `ihc_detect`, `ihc_nuclei`, `ihc_cells`), scoring without a
compartment model (`tissue_only`) and QC (`qc`)."""
