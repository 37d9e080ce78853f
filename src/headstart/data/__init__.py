"""Images and labels: folders and CSVs, splits, decoding, pixels, image size, data checks, built-in data sets."""
