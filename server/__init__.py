"""The running application: settings, CLI, HTTP app, transport endpoints, session registry."""
