"""Channel counts shared by the models, the data and the entry points."""

# An RGB image; a network's input is a multiple of it (dual-pixel views, a diffusion prior).
IMAGE_CHANNELS = 3
