"""The trained model as stored: ModelArtifact (model.json + weights), model.json alone, calibration."""
