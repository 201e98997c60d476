"""Stage two: cached layers of one or more backbones turned into features (select, concatenate,
average); it only reads the cache."""
