"""The decode loop and everything a generation's tokens pass through: settings, processors, sampling, beams, results."""
