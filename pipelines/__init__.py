"""What thinks: engine interfaces and implementations, the compute scheduler, conversation logic.

Never imports aiortc, av, aiohttp or aiomqtt.
"""
