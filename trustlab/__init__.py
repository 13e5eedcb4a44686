"""trustlab: train, sweep, evaluate and serve trustworthy-vision methods on Ray."""
__version__ = "0.1.0"
