"""Datasets: fetching and validating raw data, preprocessing, splits, the training dataset and augmentation."""
