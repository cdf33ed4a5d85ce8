"""Training for Darknet-53: the data module (`train.data`) and the trainers built on it."""
