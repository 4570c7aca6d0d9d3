"""Preparing a slide for the model: the tissue mask on a ~8 µm/px thumbnail (`tissue`),
the tile grid at the model's mpp and the streaming tile loader (`tiles`)."""
