"""Decoding: the loop that keeps every member in step (`loop`), one member's rows and KV
cache (`member_batch`), choosing tokens (`sampling`), final text (`text`) and chat prompts
(`chat`). Import the module you need; nothing is imported here.
"""
